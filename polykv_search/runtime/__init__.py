"""Runtimes that apply a plan: a kvpress press (PlanPress) and a plain-transformers context (apply_plan)."""

from polykv_search.runtime.attention import (
    ATTENTION_NAME,
    polykv_attention,
    use_polykv_attention,
)
from polykv_search.runtime.press import PlanPress, apply_plan

__all__ = ["ATTENTION_NAME", "PlanPress", "apply_plan", "polykv_attention", "use_polykv_attention"]
