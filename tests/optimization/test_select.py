"""End-to-end selection: the candidates are feasible and distinct, every uniform plan is among them, and the
measured best wins (so the result is never worse than the best uniform plan on the measured objective)."""

import pytest
import torch

from polykv_search.optimization.select import candidate_plans, select_plan
from polykv_search.plan import budget_total
from tests.plan.factories import gemma_like, llama_like, make_profile
from tests.plans import plan_of


@pytest.mark.parametrize("info", [llama_like(6), gemma_like()])
def test_candidates_are_exact_distinct_and_include_every_uniform_plan(info):
    n = info.num_layers
    torch.manual_seed(0)
    profile = make_profile(info, entropy=[1.0] * n, variance=[0.1] * n, policies=("snapkv", "streaming", "knorm"),
                           budgets=(8, 16, 32, 64, 128))
    candidates = candidate_plans(profile, average=32, cap=128)
    layers = info.compressible_layers
    total = budget_total(32, len(layers))
    for name, plan in candidates.items():
        policies, budgets = plan.policies, plan.budgets
        assert sum(budgets[i] for i in layers) == total, name
        assert all(policies[i] is None and budgets[i] is None for i in range(n) if i not in layers), name
    assert {"uniform:snapkv", "uniform:streaming", "uniform:knorm"} <= set(candidates)
    assert list(candidates)[:3] == ["uniform:snapkv", "uniform:streaming", "uniform:knorm"]  # named first
    values = list(candidates.values())
    assert len(values) == len({(tuple(p.policies), tuple(p.budgets)) for p in values})  # duplicates removed


def test_select_keeps_the_measured_best_and_ties_go_to_the_first():
    info = llama_like(1)
    candidates = {name: plan_of(info, [policy], [4]) for name, policy in (("a", "snapkv"), ("b", "knorm"),
                                                                            ("c", "tova"))}
    scores = {"snapkv": 2.0, "knorm": 1.0, "tova": 1.0}

    def measure(plans):
        return [{"kl": scores[p.policies[0]], "nll": -scores[p.policies[0]]} for p in plans]

    chosen = select_plan(measure, candidates, metric="kl")
    assert chosen.name == "b" and chosen.value == 1.0 and chosen.plan.policies == ["knorm"]
    assert chosen.ranking()[0] == ("b", 1.0) and set(chosen.measured) == {"a", "b", "c"}
    assert select_plan(measure, candidates, metric="nll").name == "a"
