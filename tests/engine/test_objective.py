"""The end-to-end objective's "task" measure: 1 - the task's score of the greedy answer, as `evaluate` scores it."""

from dataclasses import replace

import pytest

from polykv_search.data import load_samples
from polykv_search.data.metrics import score_answer
from polykv_search.engine import EndToEndObjective, PrefillEngine
from tests.conftest import sample_rows, tiny_loaded, write_jsonl
from tests.plans import uniform_of as uniform


def test_task_measure_is_one_minus_the_score_of_the_greedy_answer(tmp_path):
    lm = tiny_loaded("llama")
    samples = load_samples(write_jsonl(tmp_path / "c.jsonl", sample_rows(3, words=150)))
    engine = PrefillEngine(lm, scorers=["streaming"])
    full = engine.full_plan()
    # gold answers = the full cache's own answers: keeping the whole context must score 1 (task loss 0)
    samples = [replace(s, answers=(engine.run(engine.prefill(s), full, with_kl=False).answer,)) for s in samples]
    objective = EndToEndObjective(lm, samples, policies=["streaming"], metric="task")
    candidates = [uniform(lm.info, "streaming", 4096), uniform(lm.info, "streaming", 8)]
    measured = objective.measure(candidates)
    assert measured[0]["task"] == 0.0 and measured[0]["lost"] == pytest.approx(0.0, abs=1e-6)
    expected = []
    for sample in samples:
        state = engine.prefill(sample)
        answer = engine.run(state, candidates[1], with_kl=False).answer
        expected.append(1.0 - score_answer(sample.task, answer, list(sample.answers)))
    assert measured[1]["task"] == pytest.approx(sum(expected) / len(expected))  # one task: the plain mean
    assert objective.many(candidates) == [m["task"] for m in measured]


def test_teacher_forced_metrics_do_not_decode(tmp_path, monkeypatch):
    lm = tiny_loaded("llama")
    samples = load_samples(write_jsonl(tmp_path / "c.jsonl", sample_rows(2, words=120)))
    objective = EndToEndObjective(lm, samples, policies=["streaming"], metric="lost")

    def no_decoding(*args, **kwargs):
        raise AssertionError("a teacher-forced metric decoded")

    monkeypatch.setattr(objective.engine, "run_many", no_decoding)
    measured = objective.measure([uniform(lm.info, "streaming", 8)])
    assert "task" not in measured[0] and 0.0 <= measured[0]["lost"] <= 1.0


def test_identical_candidates_are_answered_once_and_measure_the_same(tmp_path, monkeypatch):
    lm = tiny_loaded("llama")
    samples = load_samples(write_jsonl(tmp_path / "c.jsonl", sample_rows(2, words=150)))
    objective = EndToEndObjective(lm, samples, policies=["streaming"], metric="task")
    answered = []
    run_many = objective.engine.run_many

    def counting(state, plans, **kwargs):
        answered.append(len(plans))
        return run_many(state, plans, **kwargs)

    monkeypatch.setattr(objective.engine, "run_many", counting)
    # a guard's plan that is the engine's own setting, beside that setting: one answer per sample, not two
    twin = uniform(lm.info, "streaming", 8)
    measured = objective.measure([twin, uniform(lm.info, "streaming", 8), uniform(lm.info, "streaming", 16)])
    assert answered == [2, 2] and measured[0] == measured[1]
