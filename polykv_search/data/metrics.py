"""LongBench- and RULER-style answer metrics, each a score in [0, 1], and the table from task to metric.

Normalisation and per-metric rules follow LongBench's `metrics.py`; differences are noted where they exist.
"""

from __future__ import annotations

import logging
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

from rapidfuzz import fuzz
from rouge_score import rouge_scorer

from polykv_search.data.sample import task_key
from polykv_search.errors import ConfigError

if TYPE_CHECKING:
    from polykv_search.data import Sample

logger = logging.getLogger(__name__)

MetricFn = Callable[..., float]  # (prediction, ground_truth, *, all_classes=None) -> float in [0, 1]


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, collapse whitespace (LongBench / SQuAD)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


_PUNCTUATION = frozenset(string.punctuation)
_ZH_PUNCTUATION = frozenset("！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏.")


def _token_f1(prediction: Sequence[str], ground_truth: Sequence[str]) -> float:
    common = Counter(prediction) & Counter(ground_truth)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(prediction)
    recall = same / len(ground_truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, ground_truth: str, **_: object) -> float:
    """Word-level F1 between the normalised prediction and reference (LongBench `qa_f1_score`)."""
    return _token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh(prediction: str, ground_truth: str, **_: object) -> float:
    """Character-level F1 for Chinese; LongBench segments words with jieba, which is not a dependency here."""
    def chars(text: str) -> list[str]:
        return [ch for ch in text.lower() if not ch.isspace() and ch not in _PUNCTUATION and ch not in _ZH_PUNCTUATION]

    return _token_f1(chars(prediction), chars(ground_truth))


@lru_cache(maxsize=1)
def _rouge_scorer(chinese: bool = False):  # type: ignore[no-untyped-def]
    tokenizer = _CharTokenizer() if chinese else None
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False, tokenizer=tokenizer)


class _CharTokenizer:
    """rouge_score drops every non-ASCII character; score Chinese text per character instead."""

    def tokenize(self, text: str) -> list[str]:
        return [ch for ch in text.lower() if not ch.isspace() and ch not in _PUNCTUATION and ch not in _ZH_PUNCTUATION]


def rouge_l(prediction: str, ground_truth: str, **_: object) -> float:
    """ROUGE-L F-measure (longest common subsequence of words) via the `rouge_score` package, no stemming."""
    if not prediction.strip() or not ground_truth.strip():
        return 0.0
    return float(_rouge_scorer(False).score(ground_truth, prediction)["rougeL"].fmeasure)


def rouge_l_zh(prediction: str, ground_truth: str, **_: object) -> float:
    """ROUGE-L F-measure over characters (LongBench segments with jieba instead)."""
    if not prediction.strip() or not ground_truth.strip():
        return 0.0
    return float(_rouge_scorer(True).score(ground_truth, prediction)["rougeL"].fmeasure)


def first_code_line(prediction: str) -> str:
    """The first line of `prediction` that holds no backtick, '#' or '//' (LongBench skips fences and comments)."""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            return line
    return ""


def code_edit_similarity(prediction: str, ground_truth: str, **_: object) -> float:
    """Normalised Indel similarity (rapidfuzz `fuzz.ratio` / 100) of the first code line and the reference line.

    Unlike LongBench, both lines are stripped of surrounding whitespace: indentation is not what is measured.
    """
    line = first_code_line(prediction).strip()
    return float(fuzz.ratio(line, ground_truth.strip())) / 100.0


def classification_score(prediction: str, ground_truth: str, *, all_classes: Sequence[str] | None = None,
                         **_: object) -> float:
    """1/k when the reference class is among the k class names found in the prediction, else 0 (LongBench).

    Class names that are proper substrings of the reference are not counted as competing matches; LongBench
    means the same but removes them from a list while iterating it, which can skip one.
    """
    if not all_classes:
        return substring_match(prediction, ground_truth)
    found = [name for name in all_classes if name in prediction]
    found = [name for name in found if not (name in ground_truth and name != ground_truth)]
    return 1.0 / len(found) if ground_truth in found else 0.0


def substring_match(prediction: str, ground_truth: str, **_: object) -> float:
    """1 if the reference occurs in the prediction, case-insensitive (RULER `string_match_part` per reference)."""
    return 1.0 if ground_truth.strip().lower() in prediction.lower() else 0.0


def exact_match(prediction: str, ground_truth: str, **_: object) -> float:
    """1 if prediction and reference are equal after LongBench normalisation."""
    return 1.0 if normalize_answer(prediction) == normalize_answer(ground_truth) else 0.0


def count_score(prediction: str, ground_truth: str, **_: object) -> float:
    """Share of the numbers in the prediction that equal the reference count (LongBench `count_score`)."""
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(1 for number in numbers if number == str(ground_truth).strip()) / len(numbers)


def retrieval_score(prediction: str, ground_truth: str, **_: object) -> float:
    """Share of the numbers in the prediction that equal the reference paragraph number ("Paragraph 7", "段落7")."""
    match = re.search(r"Paragraph (\d+)", ground_truth) or re.search(r"段落(\d+)", ground_truth) \
        or re.search(r"(\d+)", ground_truth)
    if match is None:
        return 0.0
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(1 for number in numbers if number == match.group(1)) / len(numbers)


METRICS: dict[str, MetricFn] = {
    "qa_f1": qa_f1,
    "qa_f1_zh": qa_f1_zh,
    "rouge_l": rouge_l,
    "rouge_l_zh": rouge_l_zh,
    "code_edit_similarity": code_edit_similarity,
    "classification_score": classification_score,
    "substring_match": substring_match,
    "exact_match": exact_match,
    "count_score": count_score,
    "retrieval_score": retrieval_score,
}
# Metrics that score the references together instead of taking the best one.
ALL_REFERENCE_METRICS = frozenset({"substring_match_all"})

TASK_METRIC: dict[str, str] = {
    # polykv-search's generated families (polykv_search.data.generate)
    "niah_single": "substring_match",
    "niah_multikey": "substring_match",
    "variable_tracking": "substring_match_all",
    "code_completion": "code_edit_similarity",
    "fewshot_classification": "classification_score",
    "prose_continuation": "rouge_l",
    # LongBench (v1) and LongBench-E (same names with an "_e" suffix, see `metric_for`)
    "narrativeqa": "qa_f1",
    "qasper": "qa_f1",
    "multifieldqa_en": "qa_f1",
    "multifieldqa_zh": "qa_f1_zh",
    "hotpotqa": "qa_f1",
    "2wikimqa": "qa_f1",
    "musique": "qa_f1",
    "dureader": "rouge_l_zh",
    "gov_report": "rouge_l",
    "qmsum": "rouge_l",
    "multi_news": "rouge_l",
    "vcsum": "rouge_l_zh",
    "trec": "classification_score",
    "triviaqa": "qa_f1",
    "samsum": "rouge_l",
    "lsht": "classification_score",
    "passage_retrieval_en": "retrieval_score",
    "passage_count": "count_score",
    "passage_retrieval_zh": "retrieval_score",
    "lcc": "code_edit_similarity",
    "repobench-p": "code_edit_similarity",
    # RULER
    "niah_single_1": "substring_match",
    "niah_single_2": "substring_match",
    "niah_single_3": "substring_match",
    "niah_multikey_1": "substring_match",
    "niah_multikey_2": "substring_match",
    "niah_multikey_3": "substring_match",
    "niah_multivalue": "substring_match_all",
    "niah_multiquery": "substring_match_all",
    "vt": "substring_match_all",
    "cwe": "substring_match_all",
    "fwe": "substring_match_all",
    "qa_1": "substring_match",
    "qa_2": "substring_match",
}
DEFAULT_METRIC = "qa_f1"

# LongBench scores only the first line of the prediction for its few-shot tasks; so do our one-line answers.
FIRST_LINE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht", "fewshot_classification", "prose_continuation"})


def metric_for(task: str) -> str:
    """The metric name for `task`; LongBench-E names ("hotpotqa_e") map to their base task, unknown ones to qa_f1."""
    key = task_key(task, TASK_METRIC)
    return TASK_METRIC[key] if key is not None else DEFAULT_METRIC


def has_metric(task: str) -> bool:
    """True when `task` (or its LongBench-E base) has a metric of its own rather than the qa_f1 fallback."""
    return task_key(task, TASK_METRIC) is not None


def scored_part_complete(task: str, prediction: str) -> bool:
    """True when more generated text cannot change the score of `prediction` for `task`: the first line is finished
    for first-line tasks, the first code line for code tasks. Lets decoding stop early with the same scores."""
    base_task = task[:-2] if task.endswith("_e") and task[:-2] in TASK_METRIC else task
    text = prediction.lstrip("\n")
    if base_task in FIRST_LINE_TASKS:
        return "\n" in text
    if metric_for(task) == "code_edit_similarity":
        finished_lines = text.split("\n")[:-1]  # lines already followed by a newline
        return any(first_code_line(line) == line for line in finished_lines)
    return False


def substring_match_all(prediction: str, answers: Sequence[str]) -> float:
    """Share of the references that occur in the prediction, case-insensitive (RULER `string_match_all`)."""
    if not answers:
        return 0.0
    low = prediction.lower()
    return sum(1.0 for answer in answers if answer.strip().lower() in low) / len(answers)


def score_answer(task: str, prediction: str, answers: Sequence[str], all_classes: Sequence[str] | None = None,
                 *, metric: str | None = None) -> float:
    """Score one prediction against its references in [0, 1]: the best reference, as LongBench does.

    `metric` overrides the task's metric; `substring_match_all` scores all references together (RULER).
    """
    name = metric or metric_for(task)
    base_task = task[:-2] if task.endswith("_e") and task[:-2] in TASK_METRIC else task
    if base_task in FIRST_LINE_TASKS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    if name in ALL_REFERENCE_METRICS:
        return substring_match_all(prediction, answers)
    if name not in METRICS:
        known = ", ".join(sorted({*METRICS, *ALL_REFERENCE_METRICS}))
        raise ConfigError(f"unknown metric {name!r}; use one of {known}")
    fn = METRICS[name]
    best = 0.0
    for answer in answers:
        best = max(best, fn(prediction, answer, all_classes=all_classes))
    return best


def score_sample(sample: Sample, prediction: str) -> float:
    """`score_answer` for a prediction on `sample`: its task, gold answers and classes."""
    classes = list(sample.all_classes) if sample.all_classes else None
    return score_answer(sample.task, prediction, list(sample.answers), classes)
