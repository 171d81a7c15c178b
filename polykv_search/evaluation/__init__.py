"""Evaluation stage: the full cache, every uniform policy, the known allocators and the user's plans answered on
held-out samples from one prefill each, scored by each task's metric, with gap recovery R per budget."""

from polykv_search.evaluation.methods import (ALLOCATORS, FULL, Method, adakv_method, build_methods, check_allocators,
                                              check_targets)
from polykv_search.evaluation.report import MethodScore, Recovery, Report, summarize
from polykv_search.evaluation.run import ScoredResult, score_methods

__all__ = ["ALLOCATORS", "FULL", "Method", "adakv_method", "MethodScore", "Recovery", "Report", "ScoredResult",
           "build_methods", "check_allocators", "check_targets", "score_methods", "summarize"]
