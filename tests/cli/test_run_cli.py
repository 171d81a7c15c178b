"""`polykv-search run` end to end on a tiny model: calibrate (with the options it passes on), optimize, evaluate."""

import json
import sys

import pytest

from polykv_search.calibration.profile import Profile
from polykv_search.cli import main
from polykv_search.plan import PlanFile
from polykv_search.policies import DEFAULT_POLICIES
from tests.conftest import sample_rows, write_jsonl


def test_run_calibrates_with_its_grid_policies_and_layer_kl_then_evaluates(monkeypatch, capsys, tiny_dir, tmp_path):
    calib = write_jsonl(tmp_path / "c.jsonl", sample_rows(3, words=200))
    held_out = write_jsonl(tmp_path / "e.jsonl", sample_rows(2, words=200))
    monkeypatch.setattr(sys, "argv", ["polykv-search", "run", "--model", str(tiny_dir), "--budget", "16",
                                      "--calib", str(calib), "--eval", str(held_out), "--out", str(tmp_path / "o"),
                                      "--cost", "layer_kl", "--policies", "snapkv,streaming", "--grid", "8,16,32",
                                      "--max-calib-samples", "2", "--allocators", "none", "--json"])
    main()
    out = json.loads(capsys.readouterr().out)
    assert {r["method"] for r in out["recovery"]} == {"plan"}  # --allocators none: no allocator is scored
    profile = Profile.load(out["profile"])
    assert profile.budgets == [8, 16, 32] and profile.policies == ["snapkv", "streaming"]
    assert profile.num_samples == 2 and "layer_kl" in profile.cost_kinds
    optimized = PlanFile.load(tmp_path / "o" / "plan_optimized.json").plans[0]
    assert {entry.policy for entry in optimized.layers} <= {"snapkv", "streaming"}
    # the guard scored the optimized rung against every uniform policy on the calibration samples
    [guard] = out["guard"]
    assert guard["budget"] == 16 and set(guard["measured"]) == {"plan", *DEFAULT_POLICIES}
    plan = PlanFile.load(out["plan"]).plans[0]
    if guard["chosen"] == "plan":
        assert plan.layers == optimized.layers and "guard: kept" in plan.search.notes
    else:
        assert {entry.policy for entry in plan.layers} == {guard["chosen"]} and "guard:" in plan.search.notes
        assert guard["measured"][guard["chosen"]] < guard["measured"]["plan"]
    assert [r["budget"] for r in out["recovery"] if r["method"] == "plan"] == [16]


def test_run_with_around_kl_calibrates_around_its_budgets(monkeypatch, capsys, tiny_dir, tmp_path):
    calib = write_jsonl(tmp_path / "c.jsonl", sample_rows(2, words=200))
    held_out = write_jsonl(tmp_path / "e.jsonl", sample_rows(1, words=200))
    monkeypatch.setattr(sys, "argv", ["polykv-search", "run", "--model", str(tiny_dir), "--budget", "8,16",
                                      "--calib", str(calib), "--eval", str(held_out), "--out", str(tmp_path / "o"),
                                      "--cost", "around_kl", "--policies", "snapkv,streaming", "--grid", "4,8,16,32",
                                      "--no-guard", "--json"])
    main()
    out = json.loads(capsys.readouterr().out)
    assert out["guard"] == [] and not (tmp_path / "o" / "plan_optimized.json").exists()
    profile = Profile.load(out["profile"])
    assert profile.around_budgets == [8, 16] and "layer_kl" not in profile.cost_kinds
    assert [p.average_budget for p in PlanFile.load(out["plan"]).plans] == [8, 16]


def test_run_weighs_the_plans_of_its_policy_sets(monkeypatch, capsys, tiny_dir, tmp_path):
    calib = write_jsonl(tmp_path / "c.jsonl", sample_rows(2, words=200))
    held_out = write_jsonl(tmp_path / "e.jsonl", sample_rows(1, words=200))
    argv = ["polykv-search", "run", "--model", str(tiny_dir), "--budget", "16", "--calib", str(calib), "--eval",
            str(held_out), "--out", str(tmp_path / "o"), "--cost", "out_err", "--policies", "snapkv,streaming,knorm",
            "--policy-set", "snapkv,streaming", "--policy-set", "all", "--grid", "8,16,32", "--compare", "streaming",
            "--allocators", "none"]
    monkeypatch.setattr(sys, "argv", argv)
    main()
    printed = capsys.readouterr()
    [line] = [ln for ln in printed.out.splitlines() if ln.startswith("guard: ")]
    kept = {"guard: 16 -> optimized plan": "guard: kept plan, ", "guard: 16 -> optimized plan (3 policies)":
            "guard: kept plan (3 policies)", "guard: 16 -> streaming": "than uniform streaming"}[line]
    assert kept in PlanFile.load(tmp_path / "o" / "plan.json").plans[0].search.notes  # what was written says so
    leads = [ln for ln in printed.out.splitlines() if ln.startswith("guard lead")]
    assert leads == [] if line == "guard: 16 -> streaming" else (  # a kept rung: its lead over streaming, printed
        len(leads) == 1 and leads[0].startswith("guard lead (task loss, 90% paired bootstrap): 16 ")
        and leads[0].endswith(" over streaming"))
    assert "plan (3 policies)" in printed.err  # the guard's table has a row for each set's plan
    optimized = PlanFile.load(tmp_path / "o" / "plan_optimized.json").plans[0]
    assert {entry.policy for entry in optimized.layers} <= {"snapkv", "streaming"}  # the first set's plan


def test_run_refuses_policy_set_all_without_policies(monkeypatch, capsys, tiny_dir, tmp_path):
    monkeypatch.setattr(sys, "argv", ["polykv-search", "run", "--model", str(tiny_dir), "--policy-set", "snapkv",
                                      "--policy-set", "all", "--out", str(tmp_path / "o")])
    try:
        main()
    except SystemExit as exc:
        assert exc.code == 2
    else:
        raise AssertionError("run accepted --policy-set all without --policies")
    assert "--policy-set all means every --policies" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_run_refuses_a_window_the_target_cannot_express_in_one_line_before_calibrating(monkeypatch, capsys, tiny_dir,
                                                                                        tmp_path):
    calib = write_jsonl(tmp_path / "c.jsonl", sample_rows(2, words=200))
    held_out = write_jsonl(tmp_path / "e.jsonl", sample_rows(1, words=200))
    monkeypatch.setattr(sys, "argv", ["polykv-search", "run", "--model", str(tiny_dir), "--budget", "16,4096",
                                      "--calib", str(calib), "--eval", str(held_out), "--out", str(tmp_path / "o"),
                                      "--target", "trtllm", "--grid", "8,16,32,64"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    [line] = [line for line in err.strip().splitlines() if not line.startswith("WARNING")]  # the data's task notes
    assert exit_info.value.code == 2 and line.startswith("error")
    assert "--target trtllm cannot spend --budget 4096" in err and "feasible averages are 8 to 64" in err
    assert not (tmp_path / "o" / "profile.safetensors").exists()


def test_evaluate_refuses_a_target_for_a_plan_it_was_not_given_before_loading_the_model(monkeypatch, capsys,
                                                                                       tmp_path):
    from tests.conftest import tiny_loaded
    from tests.plans import uniform_of

    plan = PlanFile.build(tiny_loaded("llama").info, [uniform_of(tiny_loaded("llama").info, "streaming", 16)])
    path = plan.save(tmp_path / "trt.json")
    for target, said in (("other=trtllm", "not among the plans (trt)"), ("vllm", "not one of kvpress")):
        monkeypatch.setattr(sys, "argv", ["polykv-search", "evaluate", "--model", str(tmp_path / "absent"),
                                          "--plan", str(path), "--target", target, "--out", str(tmp_path / "ev")])
        with pytest.raises(SystemExit) as exit_info:
            main()
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and said in err and len(err.strip().splitlines()) == 1
    monkeypatch.setattr(sys, "argv", ["polykv-search", "evaluate", "--model", str(tmp_path / "absent"), "--target",
                                      "trtllm"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2 and "give the plan with --plan" in capsys.readouterr().err


def test_question_aware_from_calibrate_to_evaluate(monkeypatch, capsys, tiny_dir, tmp_path):
    """calibrate --question-aware records the setting, optimize makes the plan for it (and refuses the other),
    evaluate --question-aware answers every method in it."""
    calib = write_jsonl(tmp_path / "c.jsonl", sample_rows(2, words=150))
    held_out = write_jsonl(tmp_path / "e.jsonl", sample_rows(1, words=150))

    def cli(*args: str) -> None:
        monkeypatch.setattr(sys, "argv", ["polykv-search", *args])
        main()

    cli("calibrate", "--model", str(tiny_dir), "--data", str(calib), "--policies", "snapkv,streaming",
        "--grid", "8,16,32", "--out", str(tmp_path / "p"), "--question-aware", "--json")
    profile = json.loads(capsys.readouterr().out)["profile"]
    assert Profile.load(profile).meta.question_aware
    cli("optimize", "--profile", profile, "--budget", "16", "--cost", "out_err", "--out", str(tmp_path / "plan.json"))
    assert PlanFile.load(tmp_path / "plan.json").question_aware
    with pytest.raises(SystemExit) as refused:
        cli("optimize", "--profile", profile, "--budget", "16", "--cost", "out_err", "--query-agnostic",
            "--out", str(tmp_path / "other.json"))
    assert refused.value.code != 0 and "calibrated question-aware" in capsys.readouterr().err
    assert not (tmp_path / "other.json").exists()
    cli("evaluate", "--model", str(tiny_dir), "--plan", str(tmp_path / "plan.json"), "--data", str(held_out),
        "--policies", "streaming", "--allocators", "none", "--out", str(tmp_path / "ev"), "--question-aware",
        "--json")
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["question_aware"] is True
