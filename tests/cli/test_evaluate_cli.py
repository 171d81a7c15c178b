"""The evaluate command end to end on a saved tiny model, and its bad inputs."""

import json
import sys

import pytest

from polykv_search.checkpoints import checkpoint_file
from polykv_search.cli import main
from polykv_search.data import load_samples
from polykv_search.io import read_sealed_json, write_sealed_json
from polykv_search.models import model_info
from polykv_search.plan import PlanFile, SearchInfo
from tests.cli.test_calibrate_cli import run_cli
from tests.conftest import sample_rows, tiny_loaded, write_jsonl
from tests.plans import plan_of


def hand_plan(info, budget):
    policies = ["snapkv", "expected_attention", "knorm"][: info.num_layers]
    budgets = [budget - 8, budget, budget + 8][: info.num_layers]
    return plan_of(info, policies, budgets, average=budget, search=SearchInfo(solver="manual", status="hand-made"))


@pytest.fixture(scope="module")
def tiny_info(tiny_dir):  # noqa: F811
    lm = tiny_loaded("llama")
    return model_info(lm.model, model_id=str(tiny_dir), revision="local", add_bos=False)


def test_evaluate_writes_report_with_recovery(monkeypatch, capsys, tiny_dir, tiny_info, tmp_path):  # noqa: F811
    data = write_jsonl(tmp_path / "eval.jsonl", sample_rows(2, words=150, seed=5))
    plan_path = tmp_path / "mine.json"
    PlanFile.build(tiny_info, [hand_plan(tiny_info, 16), hand_plan(tiny_info, 32)]).save(plan_path)
    monkeypatch.setattr(sys, "argv", ["polykv-search", "evaluate", "--model", str(tiny_dir), "--plan", str(plan_path),
                                      "--data", str(data), "--out", str(tmp_path / "ev"), "--policies",
                                      "snapkv,knorm,random", "--json"])
    main()
    out = json.loads(capsys.readouterr().out)
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["budgets"] == [16, 32]
    keys = set(report["methods"])
    assert {"full", "snapkv@16", "knorm@32", "random@16", "pyramidkv@32", "mine@16", "mine@32"} <= keys
    assert "cake@16" not in keys  # no profile given and none at the default path
    assert {r["method"] for r in out["recovery"]} == {"mine", "pyramidkv", "adakv"}
    assert report["methods"]["full"]["kl"] == 0.0
    assert (tmp_path / "ev" / "scores.png").read_bytes()[:4] == b"\x89PNG"
    assert "| budget | method |" in (tmp_path / "ev" / "report.md").read_text()


def test_budget_longer_than_sample_keeps_everything_and_says_so(monkeypatch, capsys, tiny_dir, tmp_path):  # noqa: F811
    data = write_jsonl(tmp_path / "eval.jsonl", sample_rows(1, words=80))
    monkeypatch.setattr(sys, "argv", ["polykv-search", "evaluate", "--model", str(tiny_dir), "--data", str(data),
                                      "--out", str(tmp_path / "ev"), "--policies", "snapkv", "--budgets", "4096",
                                      "--no-kl", "--json"])
    main()
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["methods"]["snapkv@4096"]["samples_keeping_all"] == 1
    assert report["methods"]["snapkv@4096"]["score"] == report["methods"]["full"]["score"]


def test_bad_inputs(monkeypatch, capsys, tiny_dir, tiny_info, tmp_path):  # noqa: F811
    data = write_jsonl(tmp_path / "eval.jsonl", sample_rows(1))
    not_json = tmp_path / "p.json"
    not_json.write_text("{oops")
    other = tiny_loaded("gemma")
    other_plan = tmp_path / "other.json"
    PlanFile.build(other.info, [plan_of(other.info, [None, "snapkv", None, "knorm"], [None, 16, None, 16], average=16,
                                        search=SearchInfo(solver="manual", status="x"))]).save(other_plan)
    no_answers = write_jsonl(tmp_path / "noans.jsonl", [{**sample_rows(1)[0], "answers": []}])
    cases = [
        (["--plan", not_json], "not JSON"),
        (["--plan", other_plan], "layers"),
        (["--policies", "snapkv,bogus"], "known policies"),
        (["--budgets", "0,16"], "at least 1"),
        (["--data", no_answers], "answers"),
    ]
    for args, expected in cases:
        argv = ["evaluate", "--model", tiny_dir, "--out", tmp_path / "bad"]
        if "--data" not in args:
            argv += ["--data", data]
        code, _, err = run_cli(monkeypatch, capsys, *argv, *args)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2, (args, err)
        assert len(lines) == 1 and expected.lower() in lines[0].lower(), (args, err)
        assert not (tmp_path / "bad" / "report.json").exists()


def test_budgets_option_keeps_only_those_plan_rungs(monkeypatch, capsys, tiny_dir, tiny_info, tmp_path):  # noqa: F811
    data = write_jsonl(tmp_path / "eval.jsonl", sample_rows(1, words=120, seed=3))
    plan_path = tmp_path / "mine.json"
    PlanFile.build(tiny_info, [hand_plan(tiny_info, 16), hand_plan(tiny_info, 32)]).save(plan_path)
    monkeypatch.setattr(sys, "argv", ["polykv-search", "evaluate", "--model", str(tiny_dir), "--plan", str(plan_path),
                                      "--data", str(data), "--out", str(tmp_path / "ev"), "--policies", "snapkv",
                                      "--budgets", "32", "--no-kl"])
    main()
    keys = set(json.loads((tmp_path / "ev" / "report.json").read_text())["methods"])
    assert "mine@32" in keys and "mine@16" not in keys
    code, _, err = run_cli(monkeypatch, capsys, "evaluate", "--model", tiny_dir, "--plan", plan_path, "--data",
                           data, "--out", tmp_path / "ev2", "--policies", "snapkv", "--budgets", "64")
    assert code == 2 and "none of them in --budgets" in err, err


def test_resume_reuses_checkpoints_and_refuses_damaged_ones(monkeypatch, capsys, tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "eval.jsonl", sample_rows(2, words=150, seed=5))
    args = ["evaluate", "--model", tiny_dir, "--data", data, "--out", tmp_path / "ev", "--policies", "snapkv",
            "--budgets", "16", "--allocators", "pyramidkv", "--json"]
    monkeypatch.setattr(sys, "argv", ["polykv-search", *map(str, args)])
    main()
    capsys.readouterr()
    first = json.loads((tmp_path / "ev" / "report.json").read_text())
    name = checkpoint_file(load_samples(data)[1], ".json")
    checkpoint = tmp_path / "ev" / "checkpoints" / name
    stored = read_sealed_json(checkpoint)
    assert set(stored) == {"run", "sample", "rows"}
    monkeypatch.setattr(sys, "argv", ["polykv-search", *map(str, args), "--resume"])
    main()
    capsys.readouterr()
    assert json.loads((tmp_path / "ev" / "report.json").read_text())["methods"] == first["methods"]
    write_sealed_json(checkpoint, {**stored, "run": "0" * 16})
    code, _, err = run_cli(monkeypatch, capsys, *args, "--resume")
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(errors) == 1 and f"{name} was made by another run" in errors[0], err
    for damaged in ("{broken", json.dumps({**stored, "checksum": {"sha256": "0" * 64}})):
        checkpoint.write_text(damaged)
        code, _, err = run_cli(monkeypatch, capsys, *args, "--resume")
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert code == 2 and len(errors) == 1 and f"{name} (sample 2, id s1) is damaged" in errors[0], err
