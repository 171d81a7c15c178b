"""The plan commands: schema prints the schema, validate exits 0 or 2 with one line, baseline writes valid plans."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import jsonschema
import pytest

from polykv_search.cli import main
from polykv_search.plan import PLAN_SCHEMA, PlanFile, uniform_plan, validate_plan_json
from tests.plan.factories import gemma_like, llama_like, make_profile


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["polykv-search", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def profile_path(tmp_path):
    info = gemma_like()
    profile = make_profile(info, entropy=[float(i % 7 + 1) for i in range(18)], variance=[1.0] * 18)
    return profile.save(tmp_path / "profile.safetensors")


@pytest.fixture
def plan_path(tmp_path):
    info = llama_like()
    plan_file = PlanFile.build(info, [uniform_plan(info, policy="snapkv", budget=b) for b in (256, 512)])
    return plan_file.save(tmp_path / "plan.json")


def test_schema_prints_the_schema_as_json(monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "schema")
    assert code == 0
    printed = json.loads(out)
    assert printed == PLAN_SCHEMA
    jsonschema.Draft202012Validator.check_schema(printed)


def test_validate_a_good_plan(monkeypatch, capsys, plan_path):
    code, out, _ = run_cli(monkeypatch, capsys, "validate", plan_path)
    assert code == 0
    assert out == "valid: 2 plans, budgets [256, 512]\n"


def test_validate_a_bad_plan_lists_every_problem_on_one_line(monkeypatch, capsys, plan_path):
    obj = json.loads(plan_path.read_text())
    obj["plans"][0]["layers"][0]["budget"] = 300
    obj["plans"][1]["layers"][2]["policy"] = "nope"
    plan_path.write_text(json.dumps(obj))
    code, out, err = run_cli(monkeypatch, capsys, "validate", plan_path)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"error: plan file {plan_path} has 2 problems: ")
    assert "$.plans[1].layers[2].policy 'nope' is not a registered policy" in lines[0]


@pytest.mark.parametrize("text", ["{not json", ""])
def test_validate_not_json(monkeypatch, capsys, tmp_path, text):
    path = tmp_path / "p.json"
    path.write_text(text)
    code, _, err = run_cli(monkeypatch, capsys, "validate", path)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and f"plan file {path} is not JSON (line 1 column" in err


def test_validate_against_another_model(monkeypatch, capsys, plan_path):
    from polykv_search import models

    monkeypatch.setattr(models, "load_model", lambda spec, **_: SimpleNamespace(info=gemma_like()))
    code, _, err = run_cli(monkeypatch, capsys, "validate", plan_path, "--model", "gemma3-270m")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "made for another model" in err
    monkeypatch.setattr(models, "load_model", lambda spec, **_: SimpleNamespace(info=llama_like()))
    code, out, _ = run_cli(monkeypatch, capsys, "validate", plan_path, "--model", "smollm2-135m")
    assert code == 0 and out.startswith("valid: 2 plans")


@pytest.mark.parametrize("kind", ["uniform", "pyramidkv", "cake"])
def test_baseline_writes_a_valid_ladder(monkeypatch, capsys, tmp_path, profile_path, kind):
    out_path = tmp_path / "plans" / f"{kind}.json"
    code, out, err = run_cli(monkeypatch, capsys, "baseline", "--kind", kind, "--budget", "128,1024",
                             "--profile", profile_path, "--out", out_path)
    assert code == 0, err
    assert out.strip() == str(out_path)
    plan_file = PlanFile.load(out_path)
    assert plan_file.budgets == [128, 1024]
    assert validate_plan_json(json.loads(out_path.read_text()), model=gemma_like()) == []
    assert plan_file.plans[0].search.solver == kind
    assert "B=1024" in err and "fixed" in err  # the table, on stderr
    if kind == "cake":
        assert plan_file.plans[0].search.profile_signature is not None


def test_baseline_default_output_path(monkeypatch, capsys, tmp_path, profile_path):
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_cli(monkeypatch, capsys, "baseline", "--kind", "uniform", "--policy", "tova",
                           "--budget", "64", "--profile", profile_path)
    assert code == 0
    assert out.strip() == "outputs/plans/uniform-tova.json"
    assert PlanFile.load(tmp_path / out.strip()).plan_for(64).policies[5] == "tova"


@pytest.mark.parametrize(("args", "message"), [
    (["--kind", "cake", "--budget", "64", "--model", "smollm2-135m"], "--kind cake needs --profile"),
    (["--kind", "uniform", "--budget", "64"], "give exactly one of --profile"),
    (["--kind", "flat", "--budget", "64"], "--kind 'flat' is not one of uniform, pyramidkv, cake"),
    (["--kind", "uniform", "--budget", "6x4", "PROFILE"], "--budget '6x4' is not a comma-separated list"),
    (["--kind", "uniform", "--budget", "64", "--policy", "nope", "PROFILE"], "unknown policy 'nope'"),
    (["--kind", "uniform", "--budget", "0", "PROFILE"], "--budget 0 must be at least 1"),
])
def test_baseline_bad_input_is_one_line(monkeypatch, capsys, tmp_path, profile_path, args, message):
    args = [a for a in args if a != "PROFILE"] + (["--profile", profile_path] if "PROFILE" in args else [])
    code, out, err = run_cli(monkeypatch, capsys, "baseline", *args, "--out", tmp_path / "x.json")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not (tmp_path / "x.json").exists()


def test_validate_per_head_plans_and_their_bad_forms(monkeypatch, capsys, tmp_path, tiny_dir):
    """A per-head plan validates (for its model too); one for another number of KV heads, one whose head budgets do
    not add up, and one declared 1.x each get one line and exit 2."""
    from tests.conftest import tiny_loaded
    from tests.plan.test_per_head_plan import per_head_plan

    from polykv_search.models import model_info

    info = model_info(tiny_loaded("llama").model, model_id=str(tiny_dir), revision="local")
    good = tmp_path / "heads.json"
    PlanFile.build(info, [per_head_plan(info, budget=16)]).save(good)
    code, out, _ = run_cli(monkeypatch, capsys, "validate", good, "--model", tiny_dir)
    assert code == 0 and out == "valid: 1 plan, budgets [16]\n"

    def variant(name, edit):
        obj = json.loads(good.read_text())
        edit(obj)
        (tmp_path / name).write_text(json.dumps(obj))
        return tmp_path / name

    other = tmp_path / "other.json"
    PlanFile.build(llama_like(), [per_head_plan(llama_like(), budget=16)]).save(other)  # 3 KV heads
    cases = [
        ((other, "--model", tiny_dir), "$.model.num_kv_heads is 3 but model"),
        ((variant("sum.json", lambda o: o["plans"][0]["layers"][1]["heads"][0].update(budget=99)),),
         "the KV heads' budgets sum to"),
        ((variant("v1.json", lambda o: o.update(schema_version="1.0.0")),), "need schema_version 2.x"),
        ((variant("v3.json", lambda o: o.update(schema_version="3.0.0")),), "reads 1.x.y and 2.x.y"),
    ]
    for args, expected in cases:
        code, _, err = run_cli(monkeypatch, capsys, "validate", *args)
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and expected in lines[0], (args, err)
