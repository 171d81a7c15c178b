"""`run --target` on a tiny model: calibrates the streaming costs alone, optimizes within the engine's form, guards
each rung against the engine's own setting (uniform streaming at that budget), writes a file the engine loads, and
refuses a budget the target cannot express in one line before calibrating."""

from __future__ import annotations

import json

import pytest

import polykv_search as pk
from polykv_search.errors import ConfigError
from polykv_search.export import DuoPattern, export_plan
from polykv_search.optimization import guard as guard_module
from polykv_search.optimization.crossfit import fold_plans
from polykv_search.optimization.measure import RungMeasure
from polykv_search.optimization.targets import check_target_budgets
from polykv_search.optimization.window_shapes import WINDOW_SHAPES, shape_ladder
from tests.conftest import sample_rows, write_jsonl

GRID = (8, 16, 32)
DUO_GRID = (8, 16, 32, 400)  # 400: above every context, the level a full head is counted at


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("target-run")
    return (write_jsonl(tmp / "calib.jsonl", sample_rows(2, words=150)),
            write_jsonl(tmp / "eval.jsonl", sample_rows(2, words=150, seed=4)), tmp)


@pytest.fixture(scope="module")
def trtllm_run(tiny_llama, files):
    calib, held_out, tmp = files
    return pk.run(tiny_llama, budgets=[12, 16], calib=calib, eval_data=held_out, grid=GRID,
                  compare=["snapkv", "streaming"], allocators=[], out_dir=tmp / "trtllm",
                  config=pk.OptimizeConfig(cost="head_fisher", target="trtllm"))


def test_run_for_trtllm_calibrates_streaming_and_guards_against_one_window(trtllm_run, tmp_path):
    profile = trtllm_run.calibration.profile
    assert profile.policies == ["streaming"] and "head_fisher" in profile.cost_kinds  # what the target reads
    optimized = pk.load_plan(trtllm_run.out_dir / "plan_optimized.json")
    for rung in optimized.plans:  # per layer, StreamingLLM windows from the heads' costs summed per layer
        assert not rung.per_head and {layer.policy for layer in rung.layers} == {"streaming"}
        assert "summed" in rung.search.notes
    shapes = {f"{s} windows": shape_ladder(trtllm_run.plan_file.model, s, [12, 16]) for s in WINDOW_SHAPES}
    # beside the plan, the fixed window shapes; against the engine's setting only
    assert [set(c.measured) for c in trtllm_run.guard] == [{"plan", *shapes, "streaming"}] * 2
    assert all("fold" in c.reason for c in trtllm_run.guard)  # the plan cross-fitted, as the default guard
    for choice, rung in zip(trtllm_run.guard, trtllm_run.plan_file.plans):
        candidates = {"plan": optimized, **shapes}
        expected = candidates[choice.chosen].plan_for(choice.budget) if choice.kept_plan else \
            pk.uniform_plan(trtllm_run.plan_file.model, policy="streaming", budget=choice.budget)
        assert rung.layers == expected.layers
        if choice.kept_plan:  # at most the engine's task loss and closer to the full cache (KL) than its window
            assert choice.measured[choice.chosen] <= choice.measured["streaming"]
            assert choice.second[choice.chosen] < choice.second["streaming"] and choice.tie_break == "kl"
    report = trtllm_run.report  # R against the engine's own setting beside R against the best uniform policy
    rows = report.recovery_of("plan")
    assert [r.budget for r in rows] == [12, 16]
    assert all("as TensorRT-LLM runs its windows" in c.reason for c in trtllm_run.guard)
    kls = {(r.method, r.sample_id): r.kl for r in report.results}
    for r, choice in zip(rows, trtllm_run.guard):  # the engine's setting: one window, computed as TensorRT-LLM does
        engine = report.methods[f"trtllm_window@{r.budget}"].score
        assert (r.target, r.engine_setting, r.engine_score) == ("trtllm", "trtllm_window", engine)
        assert r.best_uniform in ("snapkv", "streaming")  # the engine's own setting is not a kvpress policy
        gap = report.full_score - engine
        assert r.R_engine == (pytest.approx((r.score - engine) / gap) if gap > 1e-12 else None)
        windowed = [kls[f"trtllm_window@{r.budget}", s] for s in ("s0", "s1")]
        evicted = [kls[f"streaming@{r.budget}", s] for s in ("s0", "s1")]
        assert windowed != pytest.approx(evicted, abs=1e-6)  # a windowed prefill, not eviction after a full one
        if not choice.kept_plan:  # the guard wrote the engine's window: the same computation, the same answers
            assert [kls[f"plan@{r.budget}", s] for s in ("s0", "s1")] == windowed
    saved = json.loads(report.files["json"].read_text())["recovery"]
    assert [r["engine_setting"] for r in saved if r["method"] == "plan"] == ["trtllm_window"] * 2
    assert "R_engine" in report.files["markdown"].read_text()
    for budget in (12, 16):  # the written file loads where it did
        out = tmp_path / f"kv{budget}.json"
        assert export_plan(trtllm_run.plan_path, to="trtllm", out=out, budget=budget).is_file()


def test_the_guard_writes_the_engine_setting_where_the_target_plan_measures_worse(tiny_llama, trtllm_run, files,
                                                                                  monkeypatch):
    calib, _, _ = files

    class PlanMeasuresWorse(RungMeasure):  # every candidate but the engine's window (the last) loses a whole point
        def each(self, plans, plans_for=None):
            values = super().each(plans, plans_for)
            return [[(s, dict(m, task=m["task"] + 1.0)) for s, m in v] for v in values[:-1]] + values[-1:]

    monkeypatch.setattr(guard_module, "RungMeasure", PlanMeasuresWorse)
    config = pk.OptimizeConfig(cost="head_fisher", target="trtllm")
    optimized = pk.load_plan(trtllm_run.out_dir / "plan_optimized.json")
    guarded, rungs, _ = pk.guard_plan(tiny_llama, optimized, calib, profile=trtllm_run.calibration.profile,
                                      config=config)  # policies default to the target's engine settings
    assert [r.chosen for r in rungs] == ["streaming", "streaming"] and not any(r.kept_plan for r in rungs)
    for rung in guarded.plans:
        assert rung.layers == pk.uniform_plan(optimized.model, policy="streaming", budget=rung.average_budget).layers
        assert "no optimized rung measured at most uniform streaming's mean task" in rung.search.notes
    with pytest.raises(ConfigError, match="no setting of that engine"):
        pk.guard_plan(tiny_llama, optimized, calib, policies=["snapkv"], profile=trtllm_run.calibration.profile,
                      config=config)


@pytest.mark.parametrize("written", ["fails", "passes", "is every fold's"])
def test_the_trtllm_guard_also_grades_the_rung_it_would_write_on_the_samples_it_was_made_from(
        tiny_llama, trtllm_run, files, tmp_path, monkeypatch, written):
    calib, _, _ = files
    shift = -1.0 if written == "passes" else 1.0
    alone = []

    class OnlyThePlanLeads(RungMeasure):  # cross-fitted the plan leads surely; the shapes lose; the window is as is
        def each(self, plans, plans_for=None):
            values = super().each(plans, plans_for)
            if len(plans) == 1:  # the written rung alone, each sample answered by it
                alone.append(plans[0].average_budget)
                return [[(s, dict(m, task=m["task"] + shift, kl=m["kl"] + shift)) for s, m in values[0]]]
            plan = [(s, dict(m, task=m["task"] - 1.0, kl=m["kl"] - 1.0)) for s, m in values[0]]
            return [plan] + [[(s, dict(m, task=m["task"] + 1.0)) for s, m in v] for v in values[1:-1]] + values[-1:]

    def folds_unlike_the_plan(profile, budgets, *, config, folds):  # on 2 tiny samples every fold solves alike
        fold_of, files = fold_plans(profile, budgets, config=config, folds=folds)
        if written == "is every fold's":
            return fold_of, files
        return fold_of, [shape_ladder(files[0].model, "pyramid", budgets)] * folds

    monkeypatch.setattr(guard_module, "RungMeasure", OnlyThePlanLeads)
    monkeypatch.setattr(guard_module, "fold_plans", folds_unlike_the_plan)
    config = pk.OptimizeConfig(cost="head_fisher", target="trtllm")
    optimized = pk.load_plan(trtllm_run.out_dir / "plan_optimized.json")
    cache = tmp_path / "guard.json"
    _, rungs, _ = pk.guard_plan(tiny_llama, optimized, calib, profile=trtllm_run.calibration.profile, config=config,
                                cache=cache)
    said = "the rung written, on the samples it was optimized on: mean task"
    if written == "fails":
        assert [r.chosen for r in rungs] == ["streaming", "streaming"] and alone == [12, 16]
        assert all("failing the same tests on those samples: plan (mean task" in r.reason for r in rungs)
        assert all("no optimized rung passed every test against uniform streaming" in r.reason for r in rungs)
    elif written == "passes":
        assert [r.chosen for r in rungs] == ["plan", "plan"] and alone == [12, 16]
        assert all(said in r.reason for r in rungs)
    else:  # the cross-fitted figures are the written rung's own: nothing more to measure
        assert [r.chosen for r in rungs] == ["plan", "plan"] and alone == []
        assert not any(said in r.reason for r in rungs)

    class MeasuresNothing(RungMeasure):
        def __init__(self, *args, **kwargs):
            raise AssertionError("the cache holds every measurement, the written rungs' too")

    monkeypatch.setattr(guard_module, "RungMeasure", MeasuresNothing)
    _, again, _ = pk.guard_plan(tiny_llama, optimized, calib, profile=trtllm_run.calibration.profile, config=config,
                                cache=cache)
    assert [r.chosen for r in again] == [r.chosen for r in rungs]


def test_run_for_duo_attention_writes_a_pattern_the_engine_reads(tiny_llama, files, tmp_path):
    calib, held_out, tmp = files
    result = pk.run(tiny_llama, budgets=16, calib=calib, eval_data=held_out, grid=DUO_GRID, compare=["streaming"],
                    allocators=[], out_dir=tmp / "duo", config=pk.OptimizeConfig(cost="head_fisher",
                                                                                  target="duo-attention"))
    assert result.calibration.profile.policies == ["streaming"]
    [choice] = result.guard
    assert set(choice.measured) == {"plan", "streaming"}
    pattern = DuoPattern.read(export_plan(result.plan_path, to="duo-attention", out=tmp_path / "duo", context=400))
    assert (pattern.sink_size, pattern.recent_size) == (4, 12)  # every head at the window 16, or full
    engine = pk.PlanFile.build(tiny_llama.info, [pk.uniform_plan(tiny_llama.info, policy="streaming", budget=16)])
    own = DuoPattern.read(export_plan(engine, to="duo-attention", out=tmp_path / "own", context=400))
    assert own.head_compression_ratio == 1.0 and own.recent_size == 12  # the guard's fallback exports too


@pytest.mark.parametrize(("target", "budget", "grid", "match"), [
    ("trtllm", 64, GRID, r"--budget 64 .* the feasible averages are 8 to 32 tokens per layer"),
    ("trtllm", 4, GRID, r"--budget 4 .* 8 to 32"),
    ("duo-attention", 10, DUO_GRID, r"--budget 10 .* the windows 8, 16, 32 exactly, or any whole number from 74 "
                                    "to 400"),
    ("duo-attention", 500, DUO_GRID, r"--budget 500 "),
    ("duo-attention", 16.5, DUO_GRID, r"--budget 16.5 "),
])
def test_a_budget_the_target_cannot_express_is_refused_before_calibrating(tiny_llama, files, target, budget, grid,
                                                                          match):
    calib, held_out, tmp = files
    out = tmp / f"refused-{target}-{budget}"
    with pytest.raises(ConfigError, match=match) as refused:
        pk.run(tiny_llama, budgets=budget, calib=calib, eval_data=held_out, grid=grid, allocators=[], out_dir=out,
               config=pk.OptimizeConfig(cost="head_fisher", target=target))
    assert "\n" not in str(refused.value)
    assert not (out / "profile.safetensors").exists()  # nothing calibrated


def test_feasible_budgets_pass_the_check(tiny_llama):
    info = tiny_llama.info  # 3 layers x 2 KV heads: 6 slots
    check_target_budgets(pk.OptimizeConfig(target="trtllm"), [8, 12.5, 32], GRID, info)
    check_target_budgets(pk.OptimizeConfig(target="duo-attention", cost="head_kl"), [8, 16, 32, 74, 400], DUO_GRID,
                         info)
    with pytest.raises(ConfigError, match="--budget 73"):
        check_target_budgets(pk.OptimizeConfig(target="duo-attention", cost="head_kl"), [73], DUO_GRID, info)


def test_a_trtllm_guard_that_cannot_cross_fit_still_grades_as_the_engine_computes(tiny_llama, tmp_path):
    one = write_jsonl(tmp_path / "one.jsonl", sample_rows(1, words=150))  # one sample: no folds
    result = pk.run(tiny_llama, budgets=[12], calib=one, eval_data=one, grid=GRID, compare=["streaming"],
                    allocators=[], out_dir=tmp_path / "run",
                    config=pk.OptimizeConfig(cost="head_fisher", target="trtllm"))
    [choice] = result.guard
    assert "as TensorRT-LLM runs its windows" in choice.reason and "fold" not in choice.reason
    assert {"plan", "streaming"} <= set(choice.measured) and choice.tie_break == "kl"  # the shapes and KL too
    assert "the rung written" not in choice.reason  # measured in-sample already: what is graded is what is written
