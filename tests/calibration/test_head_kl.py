"""calibrate --head-kl and optimize --cost head_kl: each cell is the engine's KL with only that KV head compressed,
and the exact allocation over every KV head spends exactly the budget and writes a per-head plan file."""

import pytest
import torch

from polykv_search.calibration import CalibrationConfig, Profile, calibrate_model
from polykv_search.data import load_samples
from polykv_search.engine import PrefillEngine
from polykv_search.errors import ConfigError, ProfileError
from polykv_search.optimization.run import OptimizeConfig, optimize_profile, per_head_problem
from polykv_search.plan import HeadPlan, LayerPlan, Plan, PlanFile
from tests.conftest import sample_rows, tiny_loaded, write_jsonl
from tests.plans import TEST

POLICIES = ("snapkv", "knorm")
GRID = (4, 16, 1000)  # 1000: above every context, keeps everything


@pytest.fixture(scope="module", params=["llama", "gemma"])
def calibrated(request, tmp_path_factory):
    lm = tiny_loaded(request.param)
    tmp = tmp_path_factory.mktemp("hk")
    samples = load_samples(write_jsonl(tmp / "c.jsonl", sample_rows(2, words=180)))
    run = calibrate_model(lm, samples, config=CalibrationConfig(policies=POLICIES, budgets=GRID, window=16,
                                                               head_kl=True), out_dir=tmp / "out")
    return lm, samples, run


def test_each_cell_is_the_kl_of_that_head_alone(calibrated):
    lm, samples, run = calibrated
    kl = run.profile.arrays["head_kl"]
    heads = lm.info.num_kv_heads
    assert kl.shape == (2, lm.info.num_layers, heads, len(POLICIES), len(GRID))
    assert "head_kl" in Profile.load(run.path).cost_kinds
    engine = PrefillEngine(lm, scorers=POLICIES)
    for index, sample in enumerate(samples):
        state = engine.prefill(sample)
        for layer in range(lm.info.num_layers):
            if layer not in lm.info.compressible_layers:
                assert torch.isnan(kl[index, layer]).all()
                continue
            assert (kl[index, layer, :, :, 2] == 0).all()
            for h in range(heads):
                entries = [HeadPlan.full()] * heads
                entries[h] = HeadPlan.of("knorm", 4)
                plan = Plan.build(lm.info, search=TEST, layers=[
                    LayerPlan(index=i, policy=None, heads=tuple(entries)) if i == layer else LayerPlan.full(i)
                    for i in lm.info.compressible_layers])
                assert kl[index, layer, h, 1, 0].item() == pytest.approx(engine.run(state, plan).kl, rel=1e-3,
                                                                         abs=1e-5)


def test_optimize_head_kl_writes_an_exact_per_head_plan(calibrated, tmp_path):
    lm, _, run = calibrated
    plans = optimize_profile(run.profile, [8, 12], config=OptimizeConfig(cost="head_kl", solver="dp"))
    slots = len(lm.info.compressible_layers) * lm.info.num_kv_heads
    for plan, budget in zip(plans.plans, (8, 12)):
        assert plan.per_head and plan.constraint.total == plan.constraint.total_realised == budget * slots
        assert plan.search.solver == "dp" and "per KV head" in plan.search.notes
    assert plans.schema_version == "2.0.0"
    assert PlanFile.load(plans.save(tmp_path / "heads.json")) == plans
    ilp = optimize_profile(run.profile, [8], config=OptimizeConfig(cost="head_kl", solver="ilp")).plans[0]
    assert ilp.search.objective == pytest.approx(plans.plans[0].search.objective, rel=1e-6)


def test_per_head_constraints_and_refusals(calibrated):
    lm, _, run = calibrated
    layer = lm.info.compressible_layers[0]
    problem = per_head_problem(run.profile, 8, config=OptimizeConfig(cost="head_kl", allowed={"knorm": [layer]}))
    heads = lm.info.num_kv_heads
    assert problem.allowed == {"knorm": tuple(range(heads))}  # every head of that layer, and only those
    plan = optimize_profile(run.profile, [8], config=OptimizeConfig(cost="head_kl", allowed={"knorm": [layer]}))
    assert all(h.policy == "snapkv" for entry in plan.plans[0].layers if entry.index != layer
               for h in entry.heads or ())
    with pytest.raises(ConfigError, match="exact solver"):
        OptimizeConfig(cost="head_kl", solver="select").validated()
    with pytest.raises(ConfigError, match="--tie"):
        OptimizeConfig(cost="head_kl", tied=((0, 1),)).validated()
    with pytest.raises(ProfileError, match="per KV head"):
        run.profile.layer_costs("head_kl")


def test_head_kl_profiles_work_with_the_per_layer_tools_and_bad_layers_are_named(calibrated, tmp_path):
    from polykv_search.optimization.select import candidate_plans

    lm, samples, run = calibrated
    names = list(candidate_plans(run.profile, average=8))  # select reads only the per-layer costs
    assert names and not any("head_kl" in name for name in names)
    with pytest.raises(ConfigError, match="not compressible"):
        per_head_problem(run.profile, 8, config=OptimizeConfig(cost="head_kl", allowed={"knorm": [99]}))


def test_choose_measures_per_head_rungs(calibrated, tmp_path):
    import polykv_search as pk

    lm, samples, run = calibrated
    heads = optimize_profile(run.profile, [8], config=OptimizeConfig(cost="head_kl"))
    result = pk.choose(lm, {"heads": heads}, data=samples, uniform=["snapkv"], metric="kl")
    assert result.choices[0].chosen in ("heads", "snapkv") and set(result.choices[0].measured) == {"heads", "snapkv"}
