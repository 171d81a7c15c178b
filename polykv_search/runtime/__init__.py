"""Runtimes that apply a plan: a kvpress press (PlanPress), a plain-transformers context (apply_plan), and the
attention that lets layers hold caches of different lengths (polykv_attention restores the model's own)."""

from polykv_search.runtime.attention import (
    ATTENTION_NAME,
    polykv_attention,
    restore_attention,
    use_polykv_attention,
)
from polykv_search.runtime.press import PlanPress, apply_plan

__all__ = ["ATTENTION_NAME", "PlanPress", "apply_plan", "polykv_attention", "restore_attention",
           "use_polykv_attention"]
