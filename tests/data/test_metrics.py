"""Metrics on hand-computed examples, and the task -> metric table."""

from __future__ import annotations

import pytest

from polykv_search.errors import ConfigError
from polykv_search.data.metrics import (
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
    substring_match,
    substring_match_all,
)
from polykv_search.data.metrics import METRICS, has_metric, scored_part_complete


def test_normalize_answer_like_longbench():
    assert normalize_answer("The  Cat, a dog!") == "cat dog"


def test_qa_f1_hand_computed():
    # "cat sat on mat" vs "cat on mat": 3 common, P = 3/4, R = 1, F1 = 2*0.75/1.75
    assert qa_f1("The cat sat on the mat", "a cat on a mat") == pytest.approx(6 / 7)
    assert qa_f1("dog", "cat") == 0.0


def test_rouge_l_hand_computed():
    # LCS "the cat on the mat" = 5 of 6 words each side
    assert rouge_l("the cat sat on the mat", "the cat is on the mat") == pytest.approx(5 / 6)
    assert rouge_l("", "anything") == 0.0


def test_code_edit_similarity_uses_first_code_line():
    # fence and comment lines are skipped; Indel distance 2 over 24 characters
    prediction = "```python\n# add one\n    return x + 1\n```"
    assert code_edit_similarity(prediction, "return x + 2") == pytest.approx(1 - 2 / 24)
    assert code_edit_similarity("", "return x") == 0.0


def test_classification_score_like_longbench():
    classes = ["city", "city state", "country"]
    assert classification_score("city state", "city state", all_classes=classes) == 1.0  # "city" is inside the truth
    assert classification_score("city state", "city", all_classes=classes) == 0.5  # two candidates named
    assert classification_score("country", "city", all_classes=classes) == 0.0


def test_counting_and_retrieval():
    assert count_score("There are 5 paragraphs, not 3", "5") == 0.5
    assert count_score("none", "5") == 0.0
    assert retrieval_score("Paragraph 7", "Paragraph 7") == 1.0
    assert retrieval_score("Paragraph 7 or Paragraph 12", "Paragraph 7") == 0.5
    assert retrieval_score("段落3", "段落3") == 1.0


def test_substring_and_exact_match():
    assert substring_match("The number is 123456.", "123456") == 1.0
    assert substring_match("The number is 12345.", "123456") == 0.0
    assert substring_match_all("VAR ABCDE, VAR fghij", ["ABCDE", "FGHIJ", "KLMNO"]) == pytest.approx(2 / 3)
    assert exact_match("The Answer!", "answer") == 1.0
    assert exact_match("an answer here", "answer") == 0.0


def test_score_answer_takes_the_best_reference_and_first_line_where_longbench_does():
    assert score_answer("hotpotqa", "Paris", ["London", "Paris"]) == 1.0
    classes = ["class", "function"]
    assert score_answer("fewshot_classification", " class\nCode: def f():\nKind: function", ["class"], classes) == 1.0
    assert score_answer("variable_tracking", " AAAAA, VAR BBBBB", ["AAAAA", "BBBBB", "CCCCC"]) == pytest.approx(2 / 3)
    assert score_answer("niah_single", " 123456.", ["123456"]) == 1.0
    assert score_answer("lcc", "return x + 1", ["return x + 1"]) == 1.0
    assert score_answer("prose_continuation", "the cat sat\nmore text here", ["the cat sat"]) == 1.0


def test_every_score_is_in_unit_interval():
    for task in TASK_METRIC:
        value = score_answer(task, "Paragraph 1: 12 cats, class.", ["Paragraph 1", "12 cats"], ["class", "dog"])
        assert 0.0 <= value <= 1.0, task


def test_metric_table():
    assert metric_for("hotpotqa") == "qa_f1"
    assert metric_for("hotpotqa_e") == "qa_f1"
    assert metric_for("lcc") == "code_edit_similarity"
    assert metric_for("lcc_e") == "code_edit_similarity"  # LongBench-E names use their base task's metric
    assert has_metric("lcc_e") and has_metric("hotpotqa") and not has_metric("my_task") and not has_metric("x_e")
    assert metric_for("passage_retrieval_en") == "retrieval_score"
    assert metric_for("never-heard-of-it") == "qa_f1"
    assert set(TASK_METRIC.values()) <= {*METRICS, "substring_match_all"}


def test_unknown_metric_override_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown metric 'bleu'"):
        score_answer("hotpotqa", "a", ["a"], metric="bleu")


@pytest.mark.parametrize("task,text,done", [
    ("prose_continuation", "The river", False),
    ("prose_continuation", "\n\nThe river ran.\nMore", True),
    ("fewshot_classification", "assignment", False),
    ("fewshot_classification", "assignment\n", True),
    ("code_completion", "    x = 1", False),  # the line may still grow a comment
    ("code_completion", "# a comment\n", False),  # comments are skipped by the metric
    ("code_completion", "```python\n    x = 1\n", True),
    ("niah_single", "The number is 12345.\nAnd", False),  # substring metrics read everything
])
def test_scored_part_complete(task, text, done):
    assert scored_part_complete(task, text) is done


@pytest.mark.parametrize("task,answer", [("code_completion", "return value + 1"),
                                         ("prose_continuation", "the river ran to the sea"),
                                         ("fewshot_classification", "assignment")])
def test_stopping_when_complete_keeps_the_score(task, answer):
    """Whatever follows a prefix judged complete, the score of the prefix equals the score of the whole text."""
    tails = ["", "\nreturn x", " # note\nmore text", "```\nanything\n"]
    for prediction in ["return value + 1\nnext", "# c\n  return value\n", "\nthe river ran\nfar", "assignment\nx"]:
        for cut in range(len(prediction) + 1):
            prefix = prediction[:cut]
            if scored_part_complete(task, prefix):
                for tail in tails:
                    assert score_answer(task, prefix + tail, [answer]) == score_answer(task, prefix, [answer])
