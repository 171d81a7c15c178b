"""Calibration stage: run the model on a few samples and measure, per layer, signals and policy cost curves."""

from polykv_search.calibration.budgets import DEFAULT_BUDGETS
from polykv_search.calibration.header import DataSource, ProfileHeader, ProfileSample
from polykv_search.calibration.profile import Profile
from polykv_search.calibration.run import CalibrationConfig, CalibrationRun, SampleResult, calibrate_model

__all__ = ["DEFAULT_BUDGETS", "CalibrationConfig", "CalibrationRun", "DataSource", "Profile", "ProfileHeader",
           "ProfileSample", "SampleResult", "calibrate_model"]
