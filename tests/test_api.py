"""The library API on a tiny model: each stage is one call returning typed objects, the stages chain, and nothing
is printed (progress goes to the callback)."""

import json
import logging

import pytest

import polykv_search as pk
from polykv_search.optimization.measure import RungMeasure
from polykv_search.optimization.policy_sets import candidate_sets, set_names
from polykv_search.errors import ConfigError
from polykv_search.policies import DEFAULT_POLICIES, PER_HEAD_POLICIES, PER_HEAD_POLICY_SETS
from tests.conftest import sample_rows, write_jsonl

GRID = (8, 16, 32)


@pytest.fixture(autouse=True)
def no_application_logging():
    """The library as an application finds it: no handler configured (the CLI tests configure one)."""
    root, ours = logging.getLogger(), logging.getLogger("polykv_search")
    saved = root.handlers[:], ours.level
    root.handlers, ours.level = [], logging.NOTSET
    yield
    root.handlers, ours.level = saved


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("api")
    return (write_jsonl(tmp / "calib.jsonl", sample_rows(2, words=150)),
            write_jsonl(tmp / "eval.jsonl", sample_rows(2, words=150, seed=4)), tmp)


def test_calibrate_optimize_evaluate_chain_and_print_nothing(tiny_llama, files, capsys):
    calib, held_out, tmp = files
    seen = []

    def progress(stage, done, total, note):
        seen.append((stage, done, total))

    run = pk.calibrate(tiny_llama, calib, config=pk.CalibrationConfig(budgets=GRID, window=16),
                       out_dir=tmp / "profile", progress=progress)
    assert isinstance(run.profile, pk.Profile) and run.path.is_file() and run.profile.num_samples == 2
    plans = pk.optimize(run.path, budgets=[8, 16], config=pk.OptimizeConfig(solver="ilp"))
    assert isinstance(plans, pk.PlanFile) and plans.budgets == [8, 16]
    assert all(p.search.solver == "ilp" and p.search.profile_signature for p in plans.plans)
    report = pk.evaluate(tiny_llama, held_out, plans={"mine": plans}, policies=["snapkv", "knorm"],
                         profile=run.profile, out_dir=tmp / "eval", progress=progress)
    assert isinstance(report, pk.Report) and report.samples == 2
    assert [r.budget for r in report.recovery_of("mine")] == [8, 16]
    assert {r.method for r in report.recovery} == {"mine", "pyramidkv", "cake", "adakv"}
    assert report.files["json"].is_file() and report.methods["full"].kl == 0.0
    assert ("calibrate", 2, 2) in seen and ("evaluate", 2, 2) in seen
    assert seen.index(("evaluate", 0, 2)) < seen.index(("evaluate", 1, 2))  # the stage is named before its first sample
    assert capsys.readouterr() == ("", "")


def test_run_writes_everything_under_one_folder(tiny_llama, files, capsys, monkeypatch):
    calib, held_out, tmp = files
    result = pk.run(tiny_llama, budgets=16, calib=calib, eval_data=held_out, policies=["snapkv", "streaming"],
                    grid=GRID, config=pk.OptimizeConfig(cost="out_err"), out_dir=tmp / "run")
    assert isinstance(result, pk.RunResult)
    assert result.plan_path == tmp / "run" / "plan.json" and pk.load_plan(result.plan_path) == result.plan_file
    assert result.calibration.profile.policies == ["snapkv", "streaming"]
    assert [r.budget for r in result.report.recovery_of("plan")] == [16]
    assert (tmp / "run" / "signals.png").is_file() and (tmp / "run" / "plan.png").is_file()
    [choice] = result.guard  # the optimized rung against every uniform policy on the 2 calibration samples
    assert choice.budget == 16 and result.guard_samples == 2 and len(choice.measured) == 1 + len(DEFAULT_POLICIES)
    optimized = pk.load_plan(tmp / "run" / "plan_optimized.json").plans[0]
    kept = result.plan_file.plans[0]
    assert (kept.layers == optimized.layers) == (choice.chosen == "plan") and "guard:" in kept.search.notes
    assert "answered by the plan optimized without its fold (2 folds)" in kept.search.notes  # run cross-fits
    assert capsys.readouterr() == ("", "")

    def measured_again(*args, **kwargs):
        raise AssertionError("the guard measured again")

    # the guard's measurements are kept: the same plan and samples are not measured twice; a damaged cache is
    monkeypatch.setattr("polykv_search.optimization.measure.EndToEndObjective", measured_again)
    crossfit = {"profile": result.calibration.path, "config": pk.OptimizeConfig(cost="out_err")}
    again, choices, samples = pk.guard_plan(tiny_llama, tmp / "run" / "plan_optimized.json", calib,
                                            cache=tmp / "run" / "guard.json", **crossfit)
    assert again == result.plan_file and choices == result.guard and samples == 2
    with pytest.raises(AssertionError, match="measured again"):  # in-sample is another measurement
        pk.guard_plan(tiny_llama, tmp / "run" / "plan_optimized.json", calib, cache=tmp / "run" / "guard.json")
    stored = json.loads((tmp / "run" / "guard.json").read_text())
    stored["entries"][next(iter(stored["entries"]))]["task"] = "not a number"  # the right key, an edited value
    (tmp / "run" / "guard.json").write_text(json.dumps(stored))
    with pytest.raises(AssertionError, match="measured again"):
        pk.guard_plan(tiny_llama, tmp / "run" / "plan_optimized.json", calib, cache=tmp / "run" / "guard.json",
                      **crossfit)
    (tmp / "run" / "guard.json").write_text('{"run": "x"')
    with pytest.raises(AssertionError, match="measured again"):
        pk.guard_plan(tiny_llama, tmp / "run" / "plan_optimized.json", calib, cache=tmp / "run" / "guard.json",
                      **crossfit)
    with pytest.raises(ConfigError, match="pass both, or neither"):
        pk.guard_plan(tiny_llama, tmp / "run" / "plan_optimized.json", calib, profile=result.calibration.path)


def test_run_by_default_plans_per_kv_head_among_the_recipe_candidates(tiny_llama, files):
    calib, held_out, tmp = files
    result = pk.run(tiny_llama, budgets=16, calib=calib, eval_data=held_out, grid=GRID, compare=["streaming"],
                    allocators=[], out_dir=tmp / "default")
    profile = result.calibration.profile
    six, eleven = PER_HEAD_POLICY_SETS
    assert six == PER_HEAD_POLICIES and set(six) < set(eleven)
    assert profile.policies == list(eleven) and "head_fisher" in profile.cost_kinds  # every set's policies
    [optimized] = pk.load_plan(tmp / "default" / "plan_optimized.json").plans  # the first set's plan
    heads = [head for layer in optimized.layers for head in layer.heads or ()]
    assert len(heads) == tiny_llama.info.num_layers * tiny_llama.info.num_kv_heads  # a policy and budget per KV head
    assert {head.policy for head in heads} <= set(six)
    [choice] = result.guard  # the plan of each set against the uniform policy, per budget
    assert set(choice.measured) == {"plan", "plan (11 policies)", "streaming"}
    [written] = result.plan_file.plans
    ladders = {"plan": optimized, "streaming": pk.uniform_plan(tiny_llama.info, policy="streaming", budget=16),
               "plan (11 policies)": pk.optimize(profile, budgets=16, config=pk.OptimizeConfig(
                   cost="head_fisher", policies=eleven)).plans[0]}
    assert written.layers == ladders[choice.chosen].layers  # the rung the guard names is the one written
    assert written.search.profile_signature == optimized.search.profile_signature  # from the one profile


def test_the_guard_weighs_each_policy_sets_plan_made_without_each_sample(tiny_llama, files, monkeypatch):
    from polykv_search.engine.objective import EndToEndObjective
    from polykv_search.optimization.crossfit import fold_plans

    calib, _, tmp = files
    run = pk.calibrate(tiny_llama, calib, config=pk.CalibrationConfig(budgets=GRID, window=16,
                                                                     policies=("snapkv", "streaming", "knorm")),
                       out_dir=tmp / "sets")
    config = pk.OptimizeConfig(cost="out_err", policies=("streaming",))
    plan_file = pk.optimize(run.profile, budgets=[8, 16], config=config)
    wide = pk.OptimizeConfig(cost="out_err", policies=("snapkv", "streaming", "knorm"))
    fold_of, narrow_folds = fold_plans(run.profile, [8, 16], config=config)
    _, wide_folds = fold_plans(run.profile, [8, 16], config=wide)
    assert any(n.plan_for(b).layers != w.plan_for(b).layers for n, w in zip(narrow_folds, wide_folds) for b in (8, 16))
    answered = []
    original = EndToEndObjective._sample_metrics

    def spy(self, state, plans):
        answered.append((state.sample.id, plans))
        return original(self, state, plans)

    monkeypatch.setattr(EndToEndObjective, "_sample_metrics", spy)
    guarded, choices, _ = pk.guard_plan(tiny_llama, plan_file, calib, policies=["streaming"], profile=run.profile,
                                        config=config, policy_sets=[["snapkv", "streaming", "knorm"]])
    assert [set(c.measured) for c in choices] == [{"plan", "plan (3 policies)", "streaming"}] * 2
    assert len(answered) == 4  # 2 samples x 2 budgets, each answered by the plan, the alternative and the policy
    for sample_id, (plan, alternative, _) in answered:  # each slot the fold plan of its own set
        assert plan.layers == narrow_folds[fold_of[sample_id]].plan_for(plan.average_budget).layers
        assert alternative.layers == wide_folds[fold_of[sample_id]].plan_for(alternative.average_budget).layers
    whole = {"plan": plan_file, "plan (3 policies)": pk.optimize(run.profile, budgets=[8, 16], config=wide),
             "streaming": pk.PlanFile.build(tiny_llama.info, [pk.uniform_plan(tiny_llama.info, policy="streaming",
                                                                             budget=b) for b in (8, 16)])}
    for choice, rung in zip(choices, guarded.plans):  # the rung written is the whole-sample one of the winner
        assert rung.layers == whole[choice.chosen].plan_for(choice.budget).layers
    assert all(r.search.profile_signature == plan_file.plans[0].search.profile_signature for r in guarded.plans
               if "kept" in r.search.notes)

    # measured once: the same plans, sets and samples are read back from the cache, however long the solves took
    cache = tmp / "sets" / "guard.json"
    first = pk.guard_plan(tiny_llama, plan_file, calib, policies=["streaming"], profile=run.profile, config=config,
                          policy_sets=[["snapkv", "streaming", "knorm"]], cache=cache)

    def measured_again(*args, **kwargs):
        raise AssertionError("the guard measured again")

    monkeypatch.setattr("polykv_search.optimization.measure.EndToEndObjective", measured_again)
    again = pk.guard_plan(tiny_llama, pk.optimize(run.profile, budgets=[8, 16], config=config), calib,
                          policies=["streaming"], profile=run.profile, config=config,
                          policy_sets=[["snapkv", "streaming", "knorm"]], cache=cache)
    assert again[1] == first[1]
    # the sets asked about before, fewer of them: nothing new to measure, the same figures
    fewer = pk.guard_plan(tiny_llama, plan_file, calib, policies=["streaming"], profile=run.profile, config=config,
                          cache=cache)
    assert [r.measured for r in fewer[1]] == [{k: v for k, v in r.measured.items() if k != "plan (3 policies)"}
                                              for r in first[1]]
    with pytest.raises(AssertionError, match="measured again"):  # another set is another measurement
        pk.guard_plan(tiny_llama, plan_file, calib, policies=["streaming"], profile=run.profile, config=config,
                      policy_sets=[["snapkv", "streaming"]], cache=cache)
    monkeypatch.undo()
    # and only that set is measured: the plan and the uniform policy come from the cache
    measured: list[int] = []
    original = RungMeasure.each

    def counting(self, plans, plans_for=None):
        measured.append(len(plans))
        return original(self, plans, plans_for)

    monkeypatch.setattr(RungMeasure, "each", counting)
    pk.guard_plan(tiny_llama, plan_file, calib, policies=["streaming"], profile=run.profile, config=config,
                  policy_sets=[["snapkv", "streaming"]], cache=cache)
    assert measured and set(measured) == {1}  # the new set alone, at the budgets where its rungs are new
    with pytest.raises(ConfigError, match="pass the profile"):
        pk.guard_plan(tiny_llama, plan_file, calib, policy_sets=[["knorm"]])
    with pytest.raises(ConfigError, match="policy sets are for the solvers"):
        pk.guard_plan(tiny_llama, plan_file, calib, profile=run.profile, policy_sets=[["knorm"]],
                      config=pk.OptimizeConfig(solver="select", cost="out_err"))


def test_an_interrupted_guard_measures_again_only_the_budgets_it_had_not_finished(tiny_llama, files, monkeypatch):
    calib, _, tmp = files
    run = pk.calibrate(tiny_llama, calib, config=pk.CalibrationConfig(budgets=GRID, window=16,
                                                                     policies=("snapkv", "streaming")),
                       out_dir=tmp / "interrupted")
    plan_file = pk.optimize(run.profile, budgets=[8, 16], config=pk.OptimizeConfig(cost="out_err"))
    cache, calls, original = tmp / "interrupted" / "guard.json", [], RungMeasure.each

    def killed_at_the_second_budget(self, plans, plans_for=None):
        calls.append(plans[0].average_budget)
        if len(calls) == 2:
            raise KeyboardInterrupt  # a kill: nothing on the way catches it
        return original(self, plans, plans_for)

    monkeypatch.setattr(RungMeasure, "each", killed_at_the_second_budget)
    with pytest.raises(KeyboardInterrupt):
        pk.guard_plan(tiny_llama, plan_file, calib, policies=["snapkv", "streaming"], cache=cache)
    calls.clear()
    monkeypatch.setattr(RungMeasure, "each", lambda self, plans, plans_for=None: (
        calls.append(plans[0].average_budget), original(self, plans, plans_for))[1])
    resumed = pk.guard_plan(tiny_llama, plan_file, calib, policies=["snapkv", "streaming"], cache=cache)
    assert calls == [16.0]  # the first budget came from the cache
    monkeypatch.undo()
    assert resumed == pk.guard_plan(tiny_llama, plan_file, calib, policies=["snapkv", "streaming"])


def test_policy_sets_are_named_by_size_and_place(tiny_llama):
    assert [name for name, _ in set_names([["snapkv", "knorm"], ["streaming"], ["tova", "h2o"]])] == [
        "plan (set 2, 2 policies)", "plan (1 policy)", "plan (set 4, 2 policies)"]


def test_run_with_one_calibration_sample_guards_every_sets_plan_in_sample(tiny_llama, files):
    calib, held_out, tmp = files
    result = pk.run(tiny_llama, budgets=16, calib=calib, eval_data=held_out, policies=["snapkv", "streaming"],
                    policy_sets=[["streaming"], ["snapkv", "streaming"]], grid=GRID, compare=["streaming"],
                    config=pk.OptimizeConfig(cost="out_err"), max_calib_samples=1, max_eval_samples=1,
                    allocators=[], out_dir=tmp / "one_sets")
    [choice] = result.guard
    assert set(choice.measured) == {"plan", "plan (2 policies)", "streaming"} and result.guard_samples == 1
    assert "on calibration samples (" in result.plan_file.plans[0].search.notes  # in-sample: no folds


def test_run_refuses_a_policy_set_it_does_not_calibrate(tiny_llama, files):
    calib, held_out, tmp = files
    with pytest.raises(ConfigError, match="policy set snapkv,knorm names knorm, which --policies does not"):
        pk.run(tiny_llama, budgets=16, calib=calib, eval_data=held_out, policies=["snapkv", "streaming"],
               policy_sets=[["snapkv"], ["snapkv", "knorm"]], out_dir=tmp / "never3")
    with pytest.raises(ConfigError, match="policy sets are for the solvers"):
        pk.run(tiny_llama, budgets=16, calib=calib, eval_data=held_out, policy_sets=[["snapkv"], ["knorm"]],
               config=pk.OptimizeConfig(solver="select"), out_dir=tmp / "never3")
    with pytest.raises(ConfigError, match="several policy sets need the guard"):
        pk.run(tiny_llama, budgets=16, calib=calib, eval_data=held_out, policy_sets=[["snapkv"], ["knorm"]],
               guard=False, out_dir=tmp / "never3")
    with pytest.raises(ConfigError, match="are the same set"):
        pk.run(tiny_llama, budgets=16, calib=calib, eval_data=held_out,
               policy_sets=[["snapkv", "knorm"], ["knorm", "snapkv"]], out_dir=tmp / "never3")
    with pytest.raises(ConfigError, match="--only restricts knorm, which policy set snapkv does not hold"):
        pk.run(tiny_llama, budgets=16, calib=calib, eval_data=held_out, policy_sets=[["snapkv"], ["snapkv", "knorm"]],
               config=pk.OptimizeConfig(cost="head_fisher", allowed={"knorm": [0]}), out_dir=tmp / "never3")
    assert not (tmp / "never3").exists()


def test_the_default_sets_yield_to_candidates_given_otherwise():
    head = pk.OptimizeConfig(cost="head_fisher")
    assert candidate_sets(head, None, None) == (
        [p for p in dict.fromkeys(p for s in PER_HEAD_POLICY_SETS for p in s)], [list(s) for s in PER_HEAD_POLICY_SETS])
    assert candidate_sets(head, None, None, guard=False) == (list(PER_HEAD_POLICIES), [list(PER_HEAD_POLICIES)])
    assert candidate_sets(head, ["snapkv", "knorm"], None) == (["snapkv", "knorm"], [])  # --policies alone
    mine = pk.OptimizeConfig(cost="head_fisher", policies=("snapkv",))
    assert candidate_sets(mine, None, None) == (None, [])  # the config's own candidates
    assert candidate_sets(pk.OptimizeConfig(cost="head_kl"), None, None) == (None, [])  # probes: no sets


def test_bad_options_are_refused_before_any_work(tiny_llama, files):
    calib, held_out, tmp = files
    with pytest.raises(ConfigError, match="--solver 'gurobi' is not one of"):
        pk.optimize(tmp / "missing.safetensors", budgets=16, config=pk.OptimizeConfig(solver="gurobi"))
    with pytest.raises(ConfigError, match="at least 1 token"):
        pk.run(tiny_llama, budgets=0, calib=calib, eval_data=held_out, out_dir=tmp / "never")
    with pytest.raises(ConfigError, match="unknown allocator"):
        pk.evaluate(tiny_llama, held_out, allocators=["h2o"], out_dir=tmp / "never")
    with pytest.raises(ConfigError, match="unknown allocator h2o; known: pyramidkv, cake, adakv"):
        pk.run(tiny_llama, budgets=16, calib=calib, eval_data=held_out, allocators=["h2o"], out_dir=tmp / "never")
    assert not (tmp / "never").exists()


def test_run_refuses_a_bad_held_out_set_and_ignored_options_first(tiny_llama, files):
    calib, _, tmp = files
    with pytest.raises(pk.PolykvError, match="does not exist"):
        pk.run(tiny_llama, budgets=16, calib=calib, eval_data=tmp / "missing.jsonl", out_dir=tmp / "never2")
    with pytest.raises(ConfigError, match="does not take --tie"):
        pk.OptimizeConfig(solver="select", tied=((0, 1),)).validated()
    assert not (tmp / "never2").exists()


def test_choose_and_guard_report_each_prefill_and_each_budget(tiny_llama, files):
    calib, _, tmp = files
    info = tiny_llama.info
    ladders = {p: pk.PlanFile.build(info, [pk.uniform_plan(info, policy=p, budget=b) for b in (8, 16)])
               for p in ("snapkv", "streaming")}
    seen = []
    result = pk.choose(tiny_llama, ladders, data=calib, metric="lost",
                       progress=lambda *call: seen.append(call[:3]))
    assert [c.budget for c in result.choices] == [8, 16]
    assert seen == [("choose", done, 4) for done in range(5)]  # 2 prefills, then 2 budgets
    seen.clear()
    pk.guard_plan(tiny_llama, ladders["snapkv"], calib, policies=["streaming"],
                  progress=lambda *call: seen.append(call[:3]))
    assert seen[0] == ("guard", 0, 4) and seen[-1] == ("guard", 4, 4) and ("guard", 2, 4) in seen


def test_the_guard_answers_each_sample_with_the_plan_made_without_it(tiny_llama, files, monkeypatch):
    from polykv_search.engine.objective import EndToEndObjective
    from polykv_search.optimization.crossfit import fold_plans

    calib, _, tmp = files
    run = pk.calibrate(tiny_llama, calib, config=pk.CalibrationConfig(budgets=GRID, window=16),
                       out_dir=tmp / "crossfit")
    config = pk.OptimizeConfig(cost="out_err")
    plan_file = pk.optimize(run.profile, budgets=[8, 16], config=config)
    fold_of, fold_files = fold_plans(run.profile, [8, 16], config=config)
    assert sorted(fold_of.values()) == [0, 1]  # two samples, one a fold
    assert any(f.plan_for(b).layers != plan_file.plan_for(b).layers for f in fold_files for b in (8, 16))
    answered = []
    original = EndToEndObjective._sample_metrics

    def spy(self, state, plans):
        answered.append((state.sample.id, plans[0]))
        return original(self, state, plans)

    monkeypatch.setattr(EndToEndObjective, "_sample_metrics", spy)
    pk.guard_plan(tiny_llama, plan_file, calib, policies=["streaming"], profile=run.profile, config=config)
    assert len(answered) == 4  # 2 samples x 2 budgets
    for sample_id, plan in answered:
        expected = fold_files[fold_of[sample_id]].plan_for(plan.average_budget)
        assert plan.layers == expected.layers


def test_run_on_one_calibration_sample_guards_in_sample(tiny_llama, files):
    calib, held_out, tmp = files
    result = pk.run(tiny_llama, budgets=16, calib=calib, eval_data=held_out, policies=["snapkv", "streaming"],
                    grid=GRID, compare=["streaming"], config=pk.OptimizeConfig(cost="out_err"), max_calib_samples=1,
                    max_eval_samples=1, allocators=["pyramidkv"], out_dir=tmp / "one")
    assert {m.method for m in result.report.methods.values() if m.family == "allocator"} == {"pyramidkv"}
    [choice] = result.guard
    assert result.guard_samples == 1 and set(choice.measured) == {"plan", "streaming"}
    notes = result.plan_file.plans[0].search.notes
    assert "guard:" in notes and "without its fold" not in notes  # nothing to cross-fit with: measured in-sample


def test_a_kept_rung_says_by_how_much_it_led_and_how_sure_that_is(tiny_llama, files, monkeypatch):
    import polykv_search.optimization.guard as guard_module

    calib, _, tmp = files
    run = pk.calibrate(tiny_llama, calib, config=pk.CalibrationConfig(budgets=GRID, window=16,
                                                                     policies=("snapkv", "streaming")),
                       out_dir=tmp / "lead")
    plan_file = pk.optimize(run.profile, budgets=[8, 16], config=pk.OptimizeConfig(cost="out_err"))
    losses = {"plan": 0.2, "uniform": 0.5}

    class Fixed(RungMeasure):  # the plan (first) loses `plan` on every sample, each uniform policy `uniform`
        def each(self, plans, plans_for=None):
            values = super().each(plans, plans_for)
            return [[(s, dict(m, task=losses["plan" if i == 0 else "uniform"])) for s, m in v]
                    for i, v in enumerate(values)]

    monkeypatch.setattr(guard_module, "RungMeasure", Fixed)
    cache = tmp / "lead" / "guard.json"
    guarded, rungs, samples = pk.guard_plan(tiny_llama, plan_file, calib, policies=["snapkv", "streaming"],
                                            cache=cache)
    assert all(r.kept_plan for r in rungs) and samples == 2
    for rung, written in zip(rungs, guarded.plans):
        assert rung.lead.over == "snapkv"  # of two tied uniform policies, the first, as the guard picks it
        assert (rung.lead.value, rung.lead.low, rung.lead.high, rung.lead.samples) == pytest.approx((0.3, 0.3, 0.3, 2))
        assert "lead over snapkv +0.300 [90%: +0.300, +0.300]" in written.search.notes
    assert pk.guard_plan(tiny_llama, plan_file, calib, policies=["snapkv", "streaming"], cache=cache)[1] == rungs
    losses["plan"] = 0.9  # a rung the guard replaces has no lead
    _, replaced, _ = pk.guard_plan(tiny_llama, plan_file, calib, policies=["snapkv", "streaming"])
    assert not any(r.kept_plan for r in replaced) and all(r.lead is None for r in replaced)
