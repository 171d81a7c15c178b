"""Scoring model answers: LongBench/RULER-style metrics and the table from task name to metric."""

from polykv_search.evaluate.metrics import (
    DEFAULT_METRIC,
    METRICS,
    TASK_METRIC,
    classification_score,
    code_edit_similarity,
    count_score,
    exact_match,
    metric_for,
    normalize_answer,
    qa_f1,
    retrieval_score,
    rouge_l,
    score_answer,
    score_sample,
    substring_match,
    substring_match_all,
)

__all__ = [
    "DEFAULT_METRIC",
    "METRICS",
    "TASK_METRIC",
    "classification_score",
    "code_edit_similarity",
    "count_score",
    "exact_match",
    "metric_for",
    "normalize_answer",
    "qa_f1",
    "retrieval_score",
    "rouge_l",
    "score_answer",
    "score_sample",
    "substring_match",
    "substring_match_all",
]
