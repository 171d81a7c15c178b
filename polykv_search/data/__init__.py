"""Data: samples in LongBench's or kvpress's form, their loading, per-task prompts, and the generator of
calibration data."""

from polykv_search.data.loading import DataSpec, load_samples, resolve_samples
from polykv_search.data.prompts import (
    PromptParts,
    PromptTemplate,
    build_prompt,
    template_for,
    to_kvpress_form,
)
from polykv_search.data.sample import Sample, spread_over_tasks

__all__ = ["DataSpec", "PromptParts", "PromptTemplate", "Sample", "build_prompt", "load_samples", "resolve_samples",
           "spread_over_tasks", "template_for", "to_kvpress_form"]
