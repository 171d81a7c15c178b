"""The shared prefill-and-measure engine that calibrate, optimize and evaluate all use: one full-cache prefill per
sample, any number of plans answered or measured from it, and the end-to-end objective built on it."""

from polykv_search.engine.engine import Answer, PrefillEngine, PrefillState
from polykv_search.engine.objective import METRICS, EndToEndObjective, Measures, mean_over_tasks

__all__ = ["METRICS", "Answer", "EndToEndObjective", "Measures", "PrefillEngine", "PrefillState", "mean_over_tasks"]
