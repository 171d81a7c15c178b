"""The question-aware setting (kvpress's `compress_questions`) end to end on a tiny model: every stage prompts with
the question in the compressed context, the profile and the plan record the setting, and a plan answered in the
other setting is said so."""

from __future__ import annotations

import logging

import pytest

import polykv_search as pk
import polykv_search.calibration.run as calibration_run
from polykv_search.data import build_prompt, resolve_samples
from polykv_search.engine import PrefillEngine
from polykv_search.errors import ConfigError, ProfileError
from polykv_search.io import read_sealed_json
from polykv_search.plan import PlanFile
from tests.conftest import sample_rows, write_jsonl
from tests.plans import uniform_of

GRID = (8, 16, 32)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("question_aware")
    calib = write_jsonl(tmp / "calib.jsonl", sample_rows(2, words=150, seed=1))
    held = write_jsonl(tmp / "held.jsonl", sample_rows(2, words=150, seed=3))
    return calib, held, tmp


@pytest.fixture(scope="module")
def aware_run(tiny_llama, data):
    calib, held, tmp = data
    return pk.run(tiny_llama, budgets=16, calib=calib, eval_data=held, policies=["snapkv", "streaming"], grid=GRID,
                  compare=["streaming", "snapkv"], allocators=[], config=pk.OptimizeConfig(cost="out_err"),
                  question_aware=True, out_dir=tmp / "run")


def _lengths(tok, path, *, question_aware: bool) -> list[int]:
    samples, _ = resolve_samples(str(path))
    return [len(build_prompt(s, tok, max_context_tokens=4096, question_aware=question_aware).context_ids)
            for s in samples]


def test_every_stage_compresses_the_question(tiny_llama, data, aware_run):
    calib, held, _ = data
    tok = tiny_llama.tokenizer
    aware, agnostic = _lengths(tok, calib, question_aware=True), _lengths(tok, calib, question_aware=False)
    assert all(a > b for a, b in zip(aware, agnostic))  # the question is in the compressed part
    meta = aware_run.calibration.profile.meta
    assert meta.question_aware and [s.context_tokens for s in meta.samples] == aware
    written = pk.load_plan(aware_run.plan_path)
    assert written.question_aware and written.schema_version == "2.2.0"
    report = aware_run.report
    assert report.question_aware
    held_lengths = sorted(_lengths(tok, held, question_aware=True))
    assert sorted({r.sample_id: r.context_tokens for r in report.results}.values()) == held_lengths
    assert "Question-aware" in report.files["markdown"].read_text()


def test_the_engine_prefills_the_question_with_the_context(tiny_llama, data):
    calib, _, _ = data
    [sample, _] = resolve_samples(str(calib))[0]
    aware = PrefillEngine(tiny_llama, scorers=["snapkv"], question_aware=True).prefill(sample)
    agnostic = PrefillEngine(tiny_llama, scorers=["snapkv"]).prefill(sample)
    assert aware.n_context > agnostic.n_context
    assert aware.parts.context_ids + aware.parts.question_ids == agnostic.parts.context_ids + \
        agnostic.parts.question_ids  # the same prompt, cut elsewhere
    assert aware.rankings[0]["snapkv"].shape[-1] == aware.n_context


def test_optimize_refuses_the_other_setting(aware_run):
    path = aware_run.calibration.path
    assert pk.optimize(path, budgets=16, config=pk.OptimizeConfig(cost="out_err")).question_aware
    with pytest.raises(ConfigError, match="calibrated question-aware"):
        pk.optimize(path, budgets=16, config=pk.OptimizeConfig(cost="out_err"), question_aware=False)


def test_a_plan_answered_in_the_other_setting_is_said_so_once(tiny_llama, data, aware_run, caplog):
    _, held, tmp = data
    agnostic = PlanFile.build(tiny_llama.info, [uniform_of(tiny_llama.info, "snapkv", 16)])
    with caplog.at_level(logging.WARNING):
        report = pk.evaluate(tiny_llama, held, plans={"aware": aware_run.plan_file, "agnostic": agnostic},
                             policies=["streaming"], allocators=[], out_dir=tmp / "other")
    lines = [r.getMessage() for r in caplog.records if "setting" in r.getMessage()]
    assert len(lines) == 1 and "plan aware was made for the question-aware setting" in lines[0]
    assert "answered query-agnostic" in lines[0] and not report.question_aware


def test_a_resumed_calibration_in_the_other_setting_is_refused(tiny_llama, data, aware_run):
    calib, _, tmp = data
    config = pk.CalibrationConfig(policies=("snapkv", "streaming"), budgets=GRID)
    with pytest.raises(ProfileError, match="different config"):
        pk.calibrate(tiny_llama, str(calib), config=config, out_dir=tmp / "run", resume=True)


def test_a_query_agnostic_calibration_resumes_checkpoints_made_before_the_setting(tiny_llama, data, aware_run):
    calib, _, tmp = data
    config = pk.CalibrationConfig(policies=("snapkv",), budgets=GRID)
    pk.calibrate(tiny_llama, str(calib), config=config, out_dir=tmp / "agnostic")
    run_file = tmp / "agnostic" / "checkpoints" / "run.json"
    assert "question_aware" not in read_sealed_json(run_file)["config"]  # as every run.json written before 2.2
    assert read_sealed_json(tmp / "run" / "checkpoints" / "run.json")["config"]["question_aware"] is True
    pk.calibrate(tiny_llama, str(calib), config=config, out_dir=tmp / "agnostic", resume=True)  # resumes


def test_checkpoints_that_wrote_question_aware_false_resume_without_recomputing(tiny_llama, data, aware_run,
                                                                              monkeypatch):
    """Versions 2.2-2.3 wrote `question_aware: false` into query-agnostic fingerprints; later ones leave it out.
    Both describe one run: their checkpoints are used as they are, not refused and not computed again."""
    calib, _, tmp = data
    config = pk.CalibrationConfig(policies=("snapkv",), budgets=GRID)
    fingerprint = calibration_run._fingerprint
    monkeypatch.setattr(calibration_run, "_fingerprint",
                        lambda *a, **k: {**(f := fingerprint(*a, **k)), "config": {**f["config"], "question_aware": False}})
    first = pk.calibrate(tiny_llama, str(calib), config=config, out_dir=tmp / "written")
    monkeypatch.undo()
    run_file = tmp / "written" / "checkpoints" / "run.json"
    assert read_sealed_json(run_file)["config"]["question_aware"] is False
    written = {p: p.stat().st_mtime_ns for p in (tmp / "written" / "checkpoints").glob("sample-*")}
    assert written
    again = pk.calibrate(tiny_llama, str(calib), config=config, out_dir=tmp / "written", resume=True)
    assert {p: p.stat().st_mtime_ns for p in written} == written  # read back, not rewritten
    assert len(again.results) == len(first.results)
