"""optimize --target: trtllm plans are per-layer StreamingLLM windows and duo-attention plans are StreamingLLM at one
window or full per KV head, both exact, spending the budget exactly, and exporting cleanly; other options refused."""

import itertools

import numpy as np
import pytest

from polykv_search.calibration import CalibrationConfig, calibrate_model
from polykv_search.data import load_samples
from polykv_search.errors import ConfigError
from polykv_search.export import DuoPattern, duo_attention_pattern, export_plan, trtllm_kv_cache_config
from polykv_search.optimization.run import OptimizeConfig, optimize_profile
from polykv_search.optimization.targets import layer_streaming_costs
from polykv_search.plan import PlanFile
from tests.conftest import sample_rows, tiny_loaded, write_jsonl

GRID = (8, 16, 32, 400)  # 400: above every context, the level a full head is counted at


@pytest.fixture(scope="module")
def profile(tmp_path_factory):
    lm = tiny_loaded("llama")
    tmp = tmp_path_factory.mktemp("targets")
    samples = load_samples(write_jsonl(tmp / "c.jsonl", sample_rows(2, words=150)))
    run = calibrate_model(lm, samples, config=CalibrationConfig(policies=("streaming", "snapkv"), budgets=GRID,
                                                               window=16, head_kl=True), out_dir=tmp / "out")
    return run.profile


def test_trtllm_plans_are_streaming_windows_per_layer_that_export(profile, tmp_path):
    plans = optimize_profile(profile, [12, 30], config=OptimizeConfig(target="trtllm"))
    for plan, budget in zip(plans.plans, (12, 30)):
        assert {layer.policy for layer in plan.layers} == {"streaming"} and not plan.per_head
        assert all(layer.budget > 4 for layer in plan.layers)
        assert plan.constraint.total == plan.constraint.total_realised == budget * 3
        config = trtllm_kv_cache_config(plan, model=plans.model)
        assert list(config.max_attention_window) == plan.budgets and config.sink_token_length == 4
    assert export_plan(plans, to="trtllm", out=tmp_path / "kv.json", budget=30).is_file()


def test_trtllm_windows_from_a_per_head_cost_sum_each_layers_heads(profile, tmp_path):
    config = OptimizeConfig(target="trtllm", cost="head_kl")
    plans = optimize_profile(profile, [12, 30], config=config)
    costs = layer_streaming_costs(profile, config)  # (L_c, G)
    heads = profile.head_costs("head_kl").double().numpy()[:, :, profile.policies.index("streaming")]  # (L, H, G)
    assert costs == pytest.approx(heads.sum(axis=1))  # every layer of the tiny llama is compressible
    levels, curves = np.array(GRID[:3], dtype=float), np.minimum.accumulate(costs[:, :3], axis=1)  # 400: above the cap
    for plan, budget in zip(plans.plans, (12, 30)):
        assert {layer.policy for layer in plan.layers} == {"streaming"} and not plan.per_head
        assert plan.constraint.total == plan.constraint.total_realised == budget * 3
        assert "summed" in plan.search.notes and "head_kl" in plan.search.notes
        # the objective is the summed curves read at the chosen windows, and no other split of the total beats it
        read = [np.interp(layer.budget, levels, curves[i]) for i, layer in enumerate(plan.layers)]
        assert plan.search.objective == pytest.approx(sum(read), rel=1e-9, abs=1e-12)
        brute = min(sum(np.interp(b, levels, curves[i]) for i, b in enumerate(split))
                    for split in itertools.product(range(8, 33), repeat=3) if sum(split) == budget * 3)
        assert plan.search.objective == pytest.approx(brute, rel=1e-9, abs=1e-12)
    assert export_plan(plans, to="trtllm", out=tmp_path / "kv.json", budget=12).is_file()


def test_duo_attention_plans_are_exact_and_export(profile, tmp_path):
    average, slots, top = 80, 6, GRID[-1]
    plan = optimize_profile(profile, [average], config=OptimizeConfig(target="duo-attention", cost="head_kl")).plans[0]
    assert plan.constraint.total == plan.constraint.total_realised == average * slots
    budgets = [h.budget for layer in plan.layers for h in layer.heads]
    window = min(budgets)
    assert all(h.policy == "streaming" for layer in plan.layers for h in layer.heads)
    assert all(b == window or b >= top for b in budgets) and window in GRID
    assert 0 < budgets.count(window) < slots  # both kinds of head
    assert f"--context {top}" in plan.search.notes and "top grid level" in plan.search.notes
    # brute force: every window of the grid, every set of full heads the total allows
    costs = profile.head_costs("head_kl").double().numpy()[:, :, profile.policies.index("streaming")].reshape(slots, -1)
    best = np.inf
    for g, w in enumerate(GRID[:-1]):
        spare = average * slots - slots * w
        if w <= 4 or spare < 0:
            continue
        k = min(spare // (top - w), slots)
        if spare - k * (top - w) and not k:
            continue
        gains = np.sort(costs[:, g] - np.minimum(costs[:, g], costs[:, -1]))[::-1]
        best = min(best, costs[:, g].sum() - gains[:k].sum())
    assert plan.search.objective == pytest.approx(best, rel=1e-9, abs=1e-12)
    pattern = DuoPattern.read(export_plan(plan_file_of(profile, plan), to="duo-attention", out=tmp_path / "p",
                                          context=top))
    assert pattern == duo_attention_pattern(plan, model=plan_file_of(profile, plan).model, context=top)
    assert (pattern.sink_size, pattern.recent_size) == (4, window - 4)
    assert sum(not f for row in pattern.full for f in row) == budgets.count(window)


def plan_file_of(profile, plan):
    return PlanFile.build(profile.model, [plan])


@pytest.mark.parametrize(("options", "match"), [
    ({"target": "duo-attention"}, "chooses per KV head"),
    ({"target": "trtllm", "solver": "select"}, "--solver dp or ilp"),
    ({"target": "trtllm", "policies": ("snapkv",)}, "drop --policies"),
    ({"target": "duo-attention", "cost": "head_kl", "tied": ((0, 1),)}, "drop --tie"),
    ({"target": "vllm"}, "not one of kvpress, trtllm, duo-attention"),
])
def test_options_an_engine_cannot_follow_are_refused(options, match):
    with pytest.raises(ConfigError, match=match):
        OptimizeConfig(**options).validated()
