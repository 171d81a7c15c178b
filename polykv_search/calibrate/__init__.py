"""Calibration stage: run the model on a few samples and measure, per layer, signals and policy cost curves."""

from polykv_search.calibrate.budgets import DEFAULT_BUDGETS
from polykv_search.calibrate.profile import Profile

__all__ = ["DEFAULT_BUDGETS", "Profile"]
