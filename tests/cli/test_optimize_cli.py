"""optimize on a real (tiny-model) profile: a valid plan with an exact sum that evaluate accepts; bad inputs."""

import json
import sys

import pytest

from polykv_search.calibration.profile import Profile
from polykv_search.calibration import CalibrationConfig, calibrate_model
from polykv_search.cli import main
from polykv_search.data import load_samples
from polykv_search.plan import PlanFile
from tests.cli.test_calibrate_cli import run_cli
from tests.conftest import sample_rows, tiny_loaded, write_jsonl


@pytest.fixture(scope="module")
def profile_path(tmp_path_factory, tiny_dir):  # noqa: F811
    out = tmp_path_factory.mktemp("prof")
    samples = load_samples(write_jsonl(out / "c.jsonl", sample_rows(3, words=250)))
    lm = tiny_loaded("llama")
    lm.info = type(lm.info)(**{**lm.info.to_dict(), "model_id": str(tiny_dir), "revision": "local"})
    run = calibrate_model(lm, samples, config=CalibrationConfig(budgets=(8, 16, 32, 64, 128, 256), window=16), out_dir=out)
    return run.path


@pytest.mark.parametrize("solver", ["dp", "ilp"])
def test_ladder_plan_has_exact_sums_and_provenance(monkeypatch, capsys, profile_path, tmp_path, solver):
    out = tmp_path / "plan.json"
    monkeypatch.setattr(sys, "argv", ["polykv-search", "optimize", "--profile", str(profile_path), "--budget",
                                      "24,48", "--solver", solver, "--out", str(out), "--json"])
    main()
    plan_file = PlanFile.load(out)
    assert [p.average_budget for p in plan_file.plans] == [24, 48]
    for plan in plan_file.plans:
        assert sum(plan.budgets) == plan.constraint.total == 3 * plan.average_budget
        assert plan.search.solver == solver and plan.search.status == "optimal" and plan.search.gap == 0
        assert plan.search.profile_signature
    assert out.with_suffix(".png").exists()


def test_select_measures_candidates_end_to_end(monkeypatch, capsys, profile_path, tmp_path):
    out = tmp_path / "plan.json"
    monkeypatch.setattr(sys, "argv", ["polykv-search", "optimize", "--profile", str(profile_path), "--budget", "24",
                                      "--solver", "select", "--metric", "nll", "--data", str(profile_path.parent / "c.jsonl"),
                                      "--out", str(out), "--json"])
    main()
    plan = PlanFile.load(out).plans[0]
    assert plan.search.solver == "select" and sum(plan.budgets) == 3 * 24
    assert plan.search.status.startswith(("exact:", "split:", "uniform:", "pyramidkv", "cake"))
    assert "mean nll over 3 calibration samples" in plan.search.notes
    ranked = [float(item.split("=")[1]) for item in plan.search.notes.split("best first: ")[1].split(", ")]
    assert ranked == sorted(ranked) and plan.search.objective == pytest.approx(ranked[0], abs=1e-3)


def test_plan_is_accepted_by_evaluate(monkeypatch, capsys, profile_path, tiny_dir, tmp_path):  # noqa: F811
    plan = tmp_path / "plan.json"
    monkeypatch.setattr(sys, "argv", ["polykv-search", "optimize", "--profile", str(profile_path), "--budget", "32",
                                      "--out", str(plan)])
    main()
    data = write_jsonl(tmp_path / "e.jsonl", sample_rows(1, words=200, seed=9))
    monkeypatch.setattr(sys, "argv", ["polykv-search", "evaluate", "--model", str(tiny_dir), "--plan", str(plan),
                                      "--data", str(data), "--policies", "snapkv", "--profile", str(profile_path),
                                      "--out", str(tmp_path / "ev"), "--json"])
    capsys.readouterr()
    main()
    recovery = json.loads(capsys.readouterr().out)["recovery"]
    assert {r["method"] for r in recovery} == {"plan", "pyramidkv", "cake", "adakv"}


def test_bad_inputs(monkeypatch, capsys, profile_path, tmp_path):
    old = Profile.load(profile_path)
    old.header["format_version"] = 0  # no polykv-search wrote version 0: unreadable
    old_path = old.save(tmp_path / "old.safetensors")
    cases = [
        (["--profile", old_path, "--budget", "32"], "version"),
        (["--profile", profile_path, "--budget", "100000"], "feasible"),
        (["--profile", profile_path, "--budget", "32", "--policies", "snapkv,nope"], "nope"),
        (["--profile", profile_path, "--budget", "32", "--solver", "gurobi"], "one of dp, ilp, select, optuna"),
        (["--profile", tmp_path / "missing.safetensors", "--budget", "32"], "does not exist"),
        (["--profile", profile_path, "--budget", "32", "--cost", "layer_kl"], "--layer-kl"),
        (["--profile", profile_path, "--budget", "32", "--cost", "attention"], "not one of mass_lost"),
    ]
    for args, expected in cases:
        code, _, err = run_cli(monkeypatch, capsys, "optimize", *args, "--out", tmp_path / "p.json")
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2, (args, err)
        assert len(lines) == 1 and expected.lower() in lines[0].lower(), (args, err)
        assert not (tmp_path / "p.json").exists()
