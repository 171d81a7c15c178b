"""optimize --max-changes: the plan a profile was probed around, with at most K layers moved to measured cells;
checked against brute force over every set of K changes, and against the engine for a one-layer change."""

import itertools
import math

import pytest

from polykv_search.calibration.profile import AROUND_KL
from polykv_search.calibration import CalibrationConfig, calibrate_model
from polykv_search.data import load_samples
from polykv_search.errors import ConfigError
from polykv_search.engine import PrefillEngine
from polykv_search.optimization.refine import refine, trust_region
from tests.calibration.test_around import mixed_plan_file
from tests.conftest import sample_rows, write_jsonl
from tests.plans import plan_of

POLICIES = ("snapkv", "streaming", "knorm")
BUDGET = 16


@pytest.fixture(scope="module")
def refined(tmp_path_factory):
    from tests.conftest import tiny_loaded

    lm = tiny_loaded("llama")
    tmp = tmp_path_factory.mktemp("refine")
    samples = load_samples(write_jsonl(tmp / "c.jsonl", sample_rows(2, words=200)))
    names, sizes = mixed_plan_file(lm, tmp / "mixed.json", budget=BUDGET)
    grid = tuple(sorted({4, 8, 1000, *(s for s in sizes if s)}))
    config = CalibrationConfig(policies=POLICIES, budgets=grid, window=16, around_plan=str(tmp / "mixed.json"))
    profile = calibrate_model(lm, samples, config=config, out_dir=tmp / "out").profile
    return lm, samples, profile, names, sizes


def brute_force(profile, names, sizes, k_max):
    """The least summed cost over every set of at most k_max layers moved to measured cells, total kept <= the plan's."""
    costs = profile.layer_costs(AROUND_KL, budget=BUDGET).double().numpy()
    layers = profile.model.compressible_layers
    cells = {layer: [(float(costs[layer, p, g]), level - sizes[layer])
                     for p, name in enumerate(profile.policies) for g, level in enumerate(profile.budgets)
                     if (name, level) != (names[layer], sizes[layer])] for layer in layers}
    best = 0.0
    for k in range(1, k_max + 1):
        for chosen in itertools.combinations(layers, k):
            for combo in itertools.product(*(cells[layer] for layer in chosen)):
                if sum(d for _, d in combo) <= 0:
                    best = min(best, sum(c for c, _ in combo))
    return best


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_the_refinement_is_the_best_set_of_at_most_k_changes(refined, k):
    lm, _, profile, names, sizes = refined
    found = refine(profile, average_budget=BUDGET, max_changes=k)
    policies, budgets = [layer.policy for layer in found.layers], [layer.budget for layer in found.layers]
    assert found.predicted == pytest.approx(brute_force(profile, names, sizes, k), abs=1e-9)
    layers = lm.info.compressible_layers
    moved = [i for i in layers if (policies[i], budgets[i]) != (names[i], sizes[i])]
    assert moved == found.changed and len(moved) <= k
    assert sum(budgets[i] for i in layers) == sum(sizes[i] for i in layers)  # the plan's total exactly
    if k == 0:
        assert policies == names and budgets == sizes and found.predicted == 0.0


def test_a_one_layer_change_predicts_what_the_engine_measures(refined):
    """With every other layer at the plan, the cell of the changed layer is the measured plan: the predicted
    change of the share lost is the measured one (when no tokens were left over)."""
    lm, samples, profile, names, sizes = refined
    found = refine(profile, average_budget=BUDGET, max_changes=1)
    (layer,) = found.changed
    assert found.layers[layer].budget in profile.budgets  # a measured cell, nothing added
    engine = PrefillEngine(lm, scorers=POLICIES)
    refined_plan = found.to_plan(profile, average_budget=BUDGET, max_changes=1, seconds=0.0)
    shares = []
    for sample in samples:
        state = engine.prefill(sample)
        plan = engine.run(state, plan_of(lm.info, names, sizes)).kl
        moved = engine.run(state, refined_plan).kl
        shares.append(math.exp(-plan) - math.exp(-moved))
    assert sum(shares) / len(shares) == pytest.approx(found.predicted, abs=1e-4)


def test_refine_needs_a_plan_background(refined, tmp_path):
    lm, samples, _, _, _ = refined
    config = CalibrationConfig(policies=POLICIES, budgets=(8, 16), window=16, around=(BUDGET,), around_policy="snapkv")
    uniform = calibrate_model(lm, samples, config=config, out_dir=tmp_path / "u").profile
    with pytest.raises(ConfigError, match="--around-plan"):
        refine(uniform, average_budget=BUDGET, max_changes=1)
    with pytest.raises(ConfigError, match="--around-plan"):
        refine(refined[2], average_budget=32, max_changes=1)
    with pytest.raises(ConfigError, match="0 or more"):
        refine(refined[2], average_budget=BUDGET, max_changes=-1)


def test_refine_accepts_a_plan_file_whose_rung_is_uniform(refined, tmp_path):
    """An --around-plan file may hold a uniform rung (a baseline, or a rung `choose --uniform` kept): it is still the
    plan the profile was probed around."""
    from polykv_search.plan import PlanFile, uniform_plan

    lm, samples, _, _, _ = refined
    PlanFile.build(lm.info, [uniform_plan(lm.info, policy="snapkv", budget=BUDGET)]).save(tmp_path / "u.json")
    config = CalibrationConfig(policies=POLICIES, budgets=(4, 8, 16, 1000), window=16,
                               around_plan=str(tmp_path / "u.json"))
    profile = calibrate_model(lm, samples[:1], config=config, out_dir=tmp_path / "p").profile
    found = refine(profile, average_budget=BUDGET, max_changes=1)
    assert len(found.changed) <= 1


def test_the_trust_region_dp_over_heads_finds_the_best_moves_within_the_limits():
    # four KV heads, each with its one-level moves (predicted change, tokens): raising head 0 gains most but costs
    # tokens that another head must give up
    options = [[(-1.0, 48)], [(0.3, -48), (-0.4, 192)], [(0.6, -48)], [(0.2, -192)]]

    def brute(most):
        best = (0.0, [])
        for r in range(1, most + 1):
            for units in itertools.combinations(range(len(options)), r):
                for picked in itertools.product(*(range(len(options[u])) for u in units)):
                    taken = list(zip(units, picked))
                    if sum(options[u][o][1] for u, o in taken) > 0:
                        continue
                    cost = sum(options[u][o][0] for u, o in taken)
                    if cost < best[0]:
                        best = (cost, taken)
        return best

    for most in (1, 2, 3, 4):
        cost, taken = trust_region(options, most)
        expected_cost, expected = brute(most)
        assert len(taken) <= most and sum(options[u][o][1] for u, o in taken) <= 0
        assert abs(cost - expected_cost) < 1e-12 and abs(sum(options[u][o][0] for u, o in taken) - cost) < 1e-12
        assert sorted(taken) == sorted(expected)
    assert trust_region(options, 1) == (0.0, [])  # no single move pays for itself
    cost, taken = trust_region(options, 2)
    assert taken == [(0, 0), (3, 0)] and abs(cost + 0.8) < 1e-12  # head 3's tokens pay for head 0
