"""calibrate --around: probes around a uniform background at the target budget, checked against the evaluation
engine running the same plans, the background's choice, the optimizer's cost, resume and merge."""

import json
import math

import pytest
import torch

from polykv_search.calibration.around import background_plan
from polykv_search.calibration.merge import merge_budget_grids
from polykv_search.calibration.profile import AROUND_BASE, AROUND_KL, Profile
from polykv_search.calibration import CalibrationConfig, calibrate_model
from polykv_search.data import load_samples
from polykv_search.errors import ConfigError, ProfileError
from polykv_search.engine import PrefillEngine
from polykv_search.io import read_sealed_json
from polykv_search.optimization import Problem, solve
from tests.conftest import sample_rows, write_jsonl
from tests.plans import plan_of

POLICIES = ("snapkv", "streaming", "knorm")
BUDGETS = (8, 16, 1000)  # 1000 is above every context length: keeps that layer whole
AROUND = 16


def around_config(budgets=BUDGETS, **kw):
    return CalibrationConfig(policies=POLICIES, budgets=budgets, window=16, around=(AROUND,), **kw)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tests.conftest import tiny_loaded

    lm = tiny_loaded("llama")
    tmp = tmp_path_factory.mktemp("around")
    samples = load_samples(write_jsonl(tmp / "c.jsonl", sample_rows(2, words=200)))
    run = calibrate_model(lm, samples, config=around_config(), out_dir=tmp / "out")
    return lm, samples, run, tmp


def background_of(lm, policy, budget):
    names = [policy if i in lm.info.compressible_layers else None for i in range(lm.info.num_layers)]
    sizes = [budget if i in lm.info.compressible_layers else None for i in range(lm.info.num_layers)]
    return names, sizes


def test_arrays_header_and_cost_kinds(setup):
    lm, _, run, _ = setup
    kl, base = run.profile.arrays[AROUND_KL], run.profile.arrays[AROUND_BASE]
    assert kl.shape == (2, lm.info.num_layers, 1, len(POLICIES), len(BUDGETS)) and base.shape == (2, 1)
    assert torch.isfinite(kl).all() and (base > 0).all()
    (chosen,) = run.profile.header["around"]
    assert chosen["budget"] == AROUND and chosen["name"] in POLICIES
    p, g = POLICIES.index(chosen["name"]), BUDGETS.index(AROUND)
    # changing a layer to the background's own policy and budget is the background itself
    torch.testing.assert_close(kl[:, :, 0, p, g], base[:, :1].expand(-1, lm.info.num_layers), atol=1e-4, rtol=1e-3)
    assert (kl[..., 2] <= base[:, None, :, None] + 1e-4).all()  # keeping one layer whole never hurts here
    assert run.profile.cost_kinds == ["mass_lost", "out_err", AROUND_KL]
    assert run.profile.around_budgets == [AROUND]
    loaded = Profile.load(run.path)
    torch.testing.assert_close(loaded.arrays[AROUND_KL], kl)
    assert loaded.header["around"] == run.profile.header["around"]


def test_each_cell_is_the_engine_kl_of_the_background_with_that_layer_changed(setup):
    lm, samples, run, _ = setup
    engine = PrefillEngine(lm, scorers=POLICIES)
    chosen = run.profile.header["around"][0]["name"]
    kl = run.profile.arrays[AROUND_KL]
    for index, sample in enumerate(samples):
        state = engine.prefill(sample)
        for layer in lm.info.compressible_layers:
            names, sizes = background_of(lm, chosen, AROUND)
            names[layer], sizes[layer] = "knorm", BUDGETS[0]
            result = engine.run(state, plan_of(lm.info, names, sizes))
            assert kl[index, layer, 0, POLICIES.index("knorm"), 0].item() == pytest.approx(result.kl, rel=1e-3,
                                                                                            abs=1e-5)


def test_background_is_the_uniform_policy_keeping_most_of_the_output(setup):
    lm, samples, run, _ = setup
    engine = PrefillEngine(lm, scorers=POLICIES)
    kept = {p: 0.0 for p in POLICIES}
    for sample in samples:  # one task: the plain mean over samples
        state = engine.prefill(sample)
        for policy in POLICIES:
            plan = plan_of(lm.info, *background_of(lm, policy, AROUND))
            kept[policy] += math.exp(-engine.run(state, plan).kl) / len(samples)
    assert run.profile.header["around"][0]["name"] == max(POLICIES, key=kept.get)
    assert run.profile.header["around"][0]["kept"] == pytest.approx(max(kept.values()), abs=1e-4)


def test_cost_is_the_share_of_the_output_lost_and_only_at_measured_budgets(setup):
    lm, _, run, _ = setup
    profile = run.profile
    kl, base = profile.arrays[AROUND_KL].double(), profile.arrays[AROUND_BASE].double()
    expected = (torch.exp(-base)[:, None, :, None, None] - torch.exp(-kl))[:, :, 0].mean(0).float()
    torch.testing.assert_close(profile.layer_costs(AROUND_KL, budget=AROUND), expected)
    problem = Problem.from_profile(profile, average_budget=AROUND, cost=AROUND_KL)
    allocation = solve(problem, solver="dp")
    assert sum(allocation.budgets) == problem.total
    with pytest.raises(ProfileError, match="--around 32"):
        Problem.from_profile(profile, average_budget=32, cost=AROUND_KL)
    with pytest.raises(ProfileError, match="weighting mean"):
        profile.layer_costs(AROUND_KL, weighting="equal", budget=AROUND)


def test_resume_reuses_the_backgrounds_and_checkpoints(setup):
    lm, samples, run, tmp = setup
    out = tmp / "out"
    saved = read_sealed_json(out / "checkpoints" / "around.json")["backgrounds"]
    assert saved == run.profile.header["around"]
    again = calibrate_model(lm, samples, config=around_config(), out_dir=out, resume=True)
    torch.testing.assert_close(again.profile.arrays[AROUND_KL], run.profile.arrays[AROUND_KL])


def test_profiles_on_disjoint_grids_merge_into_the_union(setup):
    lm, samples, run, tmp = setup
    policy = run.profile.header["around"][0]["name"]
    parts = [calibrate_model(lm, samples, config=around_config(grid, around_policy=policy), out_dir=tmp / f"g{i}").profile
             for i, grid in enumerate([(8, 1000), (16,)])]
    merged = merge_budget_grids(parts)
    assert merged.budgets == list(BUDGETS) and merged.around_budgets == [AROUND]
    torch.testing.assert_close(merged.arrays[AROUND_KL], run.profile.arrays[AROUND_KL], atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(merged.arrays[AROUND_BASE], run.profile.arrays[AROUND_BASE], atol=1e-4, rtol=1e-3)


def test_bad_around_options():
    with pytest.raises(ConfigError, match="at least 1"):
        CalibrationConfig(policies=POLICIES, around=(0,)).validated()
    with pytest.raises(ConfigError, match="--around-policy"):
        CalibrationConfig(policies=POLICIES, around=(16,), around_policy="h2o").validated()


def test_sliding_window_layers_are_left_out_of_the_around_probes(tiny_gemma, tmp_path):
    samples = load_samples(write_jsonl(tmp_path / "c.jsonl", sample_rows(1, words=200)))
    config = CalibrationConfig(policies=("snapkv", "streaming"), budgets=(8, 32), window=16, around=(8,))
    profile = calibrate_model(tiny_gemma, samples, config=config, out_dir=tmp_path / "g").profile
    kl = profile.arrays[AROUND_KL]
    sliding = [i for i, kind in enumerate(tiny_gemma.info.layer_types) if kind == "sliding_attention"]
    assert sliding and torch.isnan(kl[:, sliding]).all()
    assert torch.isfinite(kl[:, tiny_gemma.info.compressible_layers]).all()
    assert Problem.from_profile(profile, average_budget=8, cost=AROUND_KL).layers == tuple(
        tiny_gemma.info.compressible_layers)


def mixed_plan_file(lm, path, budget=AROUND):
    """A plan at `budget` with another policy and budget in each layer (the last one takes the rest of the total)."""
    from polykv_search.plan import PlanFile, SearchInfo

    layers = lm.info.compressible_layers
    names, sizes = [None] * lm.info.num_layers, [None] * lm.info.num_layers
    for k, layer in enumerate(layers):
        names[layer] = POLICIES[k % len(POLICIES)]
        sizes[layer] = budget // 2 if k % 2 == 0 else budget + budget // 2
    sizes[layers[-1]] = budget * len(layers) - sum(sizes[i] for i in layers[:-1])
    plan = plan_of(lm.info, names, sizes, average=budget, search=SearchInfo(solver="test", status="heuristic"))
    PlanFile.build(lm.info, [plan]).save(path)
    return names, sizes


def test_probes_around_a_plan_are_the_engine_kl_of_that_plan_with_one_layer_changed(setup):
    lm, samples, _, tmp = setup
    names, sizes = mixed_plan_file(lm, tmp / "mixed.json")
    budgets = tuple(sorted({8, 1000, *(s for s in sizes if s)}))  # the plan's own sizes among them
    config = CalibrationConfig(policies=POLICIES, budgets=budgets, window=16, around_plan=str(tmp / "mixed.json"))
    assert config.validated().around == (AROUND,)  # default: the plan's rungs
    run = calibrate_model(lm, samples, config=config, out_dir=tmp / "plan_bg")
    (chosen,) = run.profile.header["around"]
    assert chosen["budget"] == AROUND and chosen["name"] == "mixed"
    assert background_plan(chosen).layers == plan_of(lm.info, names, sizes).layers
    kl, base = run.profile.arrays[AROUND_KL], run.profile.arrays[AROUND_BASE]
    engine = PrefillEngine(lm, scorers=POLICIES)
    for index, sample in enumerate(samples):
        state = engine.prefill(sample)
        assert base[index, 0].item() == pytest.approx(
            engine.run(state, plan_of(lm.info, names, sizes)).kl, rel=1e-3, abs=1e-5)
        for layer in lm.info.compressible_layers:
            own = kl[index, layer, 0, POLICIES.index(names[layer]), budgets.index(sizes[layer])]
            assert own.item() == pytest.approx(base[index, 0].item(), rel=1e-3, abs=1e-5)  # the plan itself
            changed_names, changed_sizes = list(names), list(sizes)
            changed_names[layer], changed_sizes[layer] = "knorm", 8
            result = engine.run(state, plan_of(lm.info, changed_names, changed_sizes))
            assert kl[index, layer, 0, POLICIES.index("knorm"), 0].item() == pytest.approx(result.kl, rel=1e-3,
                                                                                            abs=1e-5)
    costs = run.profile.layer_costs(AROUND_KL, budget=AROUND)  # the plan's own choice costs nothing
    for layer in lm.info.compressible_layers:
        assert costs[layer, POLICIES.index(names[layer]), budgets.index(sizes[layer])].item() == pytest.approx(
            0.0, abs=1e-5)


def test_bad_around_plans(setup):
    lm, samples, _, tmp = setup
    mixed_plan_file(lm, tmp / "bad.json")
    with pytest.raises(ConfigError, match="both set the background"):
        CalibrationConfig(policies=POLICIES, around_policy="snapkv", around_plan=str(tmp / "bad.json")).validated()
    missing_rung = CalibrationConfig(policies=POLICIES, budgets=BUDGETS, window=16, around=(32,),
                                     around_plan=str(tmp / "bad.json"))
    with pytest.raises(ConfigError, match="no rung at average budget 32"):
        calibrate_model(lm, samples, config=missing_rung, out_dir=tmp / "bad1")
    uncalibrated = CalibrationConfig(policies=("snapkv", "streaming"), budgets=BUDGETS, window=16,
                                     around_plan=str(tmp / "bad.json"))
    with pytest.raises(ConfigError, match="knorm at layer .* add it to --policies"):
        calibrate_model(lm, samples, config=uncalibrated, out_dir=tmp / "bad2")


def test_a_version_1_profile_is_read_with_its_backgrounds_as_plans(setup):
    """Version 1 stored a uniform background as its policy and a plan's as per-layer lists; both load as plans."""
    lm, _, run, tmp = setup
    chosen = run.profile.header["around"][0]
    names, sizes = mixed_plan_file(lm, tmp / "v1plan.json")
    for old_entry, expected in (
            ({"budget": AROUND, "policy": chosen["name"], "kept": chosen["kept"]}, background_plan(chosen)),
            ({"budget": AROUND, "plan": "v1plan", "policies": names, "budgets": sizes}, plan_of(lm.info, names, sizes))):
        old = Profile(header={**json.loads(json.dumps(run.profile.header)), "format_version": 1,
                              "around": [old_entry]}, arrays=dict(run.profile.arrays))
        (entry,) = Profile.load(old.save(tmp / "v1.safetensors")).around_backgrounds()
        assert entry["budget"] == AROUND and entry["name"] == old_entry.get("policy", "v1plan")
        assert background_plan(entry).layers == expected.layers
