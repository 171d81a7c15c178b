"""The report's gap recovery and its bootstrap interval, on hand-made scores."""

import pytest

from polykv_search.evaluation import Method, ScoredResult, summarize
from tests.conftest import tiny_loaded
from tests.plans import uniform_of


def _rows(method: str, scores: dict[str, list[float]]) -> list[ScoredResult]:
    return [ScoredResult(sample_id=f"{task}-{i}", task=task, method=method, answer="", score=s, kl=0.0,
                         kept_all_layers=[], context_tokens=100)
            for task, values in scores.items() for i, s in enumerate(values)]


def _method(name: str, family: str) -> Method:
    return Method(name, family, uniform_of(tiny_loaded("llama").info, "snapkv", 64))


def test_recovery_and_its_interval():
    full = {"a": [1, 1, 1, 1], "b": [1, 1, 1, 0]}
    uniform = {"a": [0, 0, 1, 0], "b": [1, 0, 0, 0]}
    better = {"a": [1, 0, 1, 1], "b": [1, 0, 1, 0]}  # never below the uniform policy, sample by sample
    results = (_rows("full", full) + _rows("u@64", uniform) + _rows("plan@64", better)
               + _rows("same@64", uniform))
    methods = [_method("u", "uniform"), _method("plan", "plan"), _method("same", "plan")]
    report = summarize(results, methods)
    rows = {r.method: r for r in report.recovery}
    s_full, s_u, s_plan = (7 / 4) / 2, (2 / 4) / 2, (5 / 4) / 2
    assert rows["plan"].R == pytest.approx((s_plan - s_u) / (s_full - s_u))
    low, high = rows["plan"].R_90
    assert 0.0 <= low <= rows["plan"].R <= high <= 1.0  # paired: a plan never below it cannot dip below 0
    assert rows["same"].R == 0.0 and rows["same"].R_90 == [0.0, 0.0]
    assert "R 90% bootstrap" in report.markdown()
    assert report.recovery_of("plan") == [rows["plan"]]
    assert type(report).from_dict(report.to_dict()) == report  # the JSON round-trips


def test_a_plan_made_for_an_engine_gets_r_against_the_engines_own_setting():
    full = {"a": [1, 1, 1, 1], "b": [1, 1, 1, 1]}
    snapkv = {"a": [1, 0, 1, 0], "b": [1, 0, 0, 0]}  # the best uniform policy overall
    streaming = {"a": [0, 0, 1, 0], "b": [0, 0, 0, 0]}  # the engine's own setting
    plan = {"a": [1, 0, 1, 0], "b": [1, 0, 1, 0]}
    results = (_rows("full", full) + _rows("snapkv@64", snapkv) + _rows("streaming@64", streaming)
               + _rows("trt@64", plan) + _rows("any@64", plan))
    info = tiny_loaded("llama").info
    methods = [Method("snapkv", "uniform", uniform_of(info, "snapkv", 64)),
               Method("streaming", "uniform", uniform_of(info, "streaming", 64)),
               Method("trt", "plan", uniform_of(info, "streaming", 64), target="trtllm", engine=("streaming",)),
               Method("any", "plan", uniform_of(info, "snapkv", 64))]
    report = summarize(results, methods)
    rows = {r.method: r for r in report.recovery}
    s_full, s_snap, s_stream, s_plan = 1.0, 3 / 8, 1 / 8, 4 / 8
    trt = rows["trt"]
    assert trt.best_uniform == "snapkv" and trt.R == pytest.approx((s_plan - s_snap) / (s_full - s_snap))
    assert (trt.target, trt.engine_setting) == ("trtllm", "streaming")
    assert trt.engine_score == pytest.approx(s_stream)
    assert trt.R_engine == pytest.approx((s_plan - s_stream) / (s_full - s_stream))
    assert trt.R_engine_90 and trt.R_engine_90[0] <= trt.R_engine <= trt.R_engine_90[1]
    assert rows["any"].target is None and rows["any"].R_engine is None  # a plan made for no engine
    text = report.markdown()
    assert "R_engine" in text
    assert f"| 64 | trt | trtllm | 0.500 | streaming | 0.125 | 1.000 | {trt.R_engine:.2f} |" in text
    assert "| any | " not in text.split("R_engine =")[1]
    assert type(report).from_dict(report.to_dict()) == report
    legacy = report.to_dict()  # a report.json written before the engine fields still loads
    for r in legacy["recovery"]:
        for key in ("target", "engine_setting", "engine_score", "R_engine", "R_engine_90"):
            r.pop(key)
    assert type(report).from_dict(legacy).recovery[0].R_engine is None


def test_runs_summary_lines_give_r_against_the_engine_for_a_target_plan():
    from polykv_search.cli.render import recovery_lines
    from polykv_search.evaluation import Recovery, Report

    common = dict(budget=64, family="plan", score=0.5, best_uniform="snapkv", best_uniform_score=0.375,
                  full_score=1.0, R=0.2, R_90=[0.1, 0.3], kl=None, best_uniform_kl=None)
    report = Report(tasks=["a"], methods={}, budgets=[64], samples=8, recovery=[
        Recovery(method="trt", target="trtllm", engine_setting="streaming", engine_score=0.125, R_engine=0.4286,
                 R_engine_90=[0.3, 0.5], **common),
        Recovery(method="any", **common)])
    trt, = [line for line in recovery_lines(report, "trt") if "own setting" in line]
    assert trt == ("R against trtllm's own setting at 64 tokens/layer: 0.429 (streaming 0.125, 90% bootstrap "
                   "[+0.30, +0.50])")
    assert len(recovery_lines(report, "trt")) == 2 and len(recovery_lines(report, "any")) == 1


def test_a_plan_given_target_trtllm_that_is_no_window_plan_is_refused_before_any_prefill():
    from polykv_search.errors import ConfigError
    from polykv_search.evaluation import build_methods
    from polykv_search.plan import PlanFile

    info = tiny_loaded("llama").info
    windows = PlanFile.build(info, [uniform_of(info, "streaming", 16)])
    methods = build_methods(info, budgets=[16], uniform_policies=["snapkv"], allocators=[], allocator_policy="snapkv",
                            profile=None, plans=[("trt", windows)], targets={"trt": "trtllm"})
    assert {(m.key, m.family, m.windowed) for m in methods} == {
        ("snapkv@16", "uniform", False), ("trt@16", "plan", True), ("trtllm_window@16", "engine", True)}
    ranked = PlanFile.build(info, [uniform_of(info, "snapkv", 16)])
    with pytest.raises(ConfigError, match=r"--target trtllm: plan trt is no TensorRT-LLM plan .*use snapkv, not "
                                          r"streaming"):
        build_methods(info, budgets=[16], uniform_policies=["snapkv"], allocators=[], allocator_policy="snapkv",
                      profile=None, plans=[("trt", ranked)], targets={"trt": "trtllm"})
