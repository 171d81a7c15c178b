"""End-to-end selection: the candidates are feasible and distinct, every uniform plan is among them, and the
measured best wins (so the result is never worse than the best uniform plan on the measured objective)."""

import pytest
import torch

from polykv_search.optimize.select import candidate_plans, select_plan
from polykv_search.plan import budget_total
from tests.plan.factories import gemma_like, llama_like, make_profile


@pytest.mark.parametrize("info", [llama_like(6), gemma_like()])
def test_candidates_are_exact_distinct_and_include_every_uniform_plan(info):
    n = info.num_layers
    torch.manual_seed(0)
    profile = make_profile(info, entropy=[1.0] * n, variance=[0.1] * n, policies=("snapkv", "streaming", "knorm"),
                           budgets=(8, 16, 32, 64, 128))
    candidates = candidate_plans(profile, average=32, cap=128)
    layers = info.compressible_layers
    total = budget_total(32, len(layers))
    for name, (policies, budgets) in candidates.items():
        assert sum(budgets[i] for i in layers) == total, name
        assert all(policies[i] is None and budgets[i] is None for i in range(n) if i not in layers), name
    assert {"uniform:snapkv", "uniform:streaming", "uniform:knorm"} <= set(candidates)
    assert list(candidates)[:3] == ["uniform:snapkv", "uniform:streaming", "uniform:knorm"]  # named first
    values = list(candidates.values())
    assert len(values) == len({(tuple(p), tuple(b)) for p, b in values})  # duplicates removed


def test_select_keeps_the_measured_best_and_ties_go_to_the_first():
    candidates = {"a": (["x"], [4]), "b": (["y"], [4]), "c": (["z"], [4])}
    scores = {"x": 2.0, "y": 1.0, "z": 1.0}

    def measure(plans):
        return [{"kl": scores[p[0]], "nll": -scores[p[0]]} for p, _ in plans]

    chosen = select_plan(measure, candidates, metric="kl")
    assert chosen.name == "b" and chosen.value == 1.0 and chosen.policies == ["y"]
    assert chosen.ranking()[0] == ("b", 1.0) and set(chosen.measured) == {"a", "b", "c"}
    assert select_plan(measure, candidates, metric="nll").name == "a"
