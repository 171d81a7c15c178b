"""The Optuna search: seeds are represented exactly, never beaten by the result, and a killed study resumes."""

import pytest

from polykv_search.errors import SolverError
from polykv_search.optimization.optuna_search import open_storage, repair, search
from tests.plan.factories import llama_like
from tests.plans import plan_of

LAYERS = [0, 1, 2, 3]
POLICIES = ["snapkv", "knorm", "tova"]
INFO = llama_like(4)


def toy_objective(plan):
    """Non-additive: layer 1 wants knorm, others snapkv; budgets should favour layer 2."""
    policies, budgets = plan.policies, plan.budgets
    cost = 0.0
    for layer in LAYERS:
        want = "knorm" if layer == 1 else "snapkv"
        cost += (0.0 if policies[layer] == want else 1.0) + (3.0 if layer == 2 else 1.0) / budgets[layer]
    return cost + 0.1 * (policies[0] == policies[3])


def test_repair_is_identity_on_exact_sums_and_fixes_others():
    assert repair([10, 20, 30, 40], 100, floor=1, cap=None) == [10, 20, 30, 40]
    fixed = repair([10, 10, 10, 10], 100, floor=1, cap=50)
    assert sum(fixed) == 100 and all(1 <= b <= 50 for b in fixed)


def test_never_worse_than_its_seeds_and_seeds_are_exact():
    good = plan_of(INFO, ["snapkv", "knorm", "snapkv", "tova"], [20, 20, 40, 20])
    bad = plan_of(INFO, ["tova"] * 4, [25, 25, 25, 25])
    result = search(toy_objective, info=INFO, average_budget=25, policies=POLICIES, total=100, floor=4, cap=80,
                    seeds={"exact": good, "uniform": bad}, n_trials=12, seed=1)
    assert result.seed_objectives["exact"] == pytest.approx(toy_objective(good))  # represented exactly
    assert result.objective <= min(result.seed_objectives.values()) + 1e-12
    assert sum(result.plan.budgets) == 100 and all(4 <= b <= 80 for b in result.plan.budgets)
    assert result.objective == pytest.approx(toy_objective(result.plan))


class Killed(Exception):
    pass


def test_killed_study_resumes_from_its_journal(tmp_path):
    storage = f"journal:{tmp_path / 'study.log'}"
    calls = []

    def dying(plan):
        calls.append(1)
        if len(calls) == 5:
            raise Killed
        return toy_objective(plan)

    seeds = {"exact": plan_of(INFO, ["snapkv", "knorm", "snapkv", "snapkv"], [20, 20, 40, 20])}
    with pytest.raises(Killed):
        search(dying, info=INFO, average_budget=25, policies=POLICIES, total=100, seeds=seeds, n_trials=10,
               storage=storage, study_name="s")
    calls.clear()
    result = search(toy_objective, info=INFO, average_budget=25, policies=POLICIES, total=100, seeds=seeds,
                    n_trials=10, storage=storage, study_name="s")
    assert result.trials >= 10  # the four finished trials were kept; the seed was not enqueued twice
    assert "exact" in result.seed_objectives


def test_bad_storage_url_is_one_clear_error():
    with pytest.raises(SolverError, match="cannot open Optuna storage"):
        open_storage("notadb://nowhere/x")


def test_infeasible_total_names_the_range():
    with pytest.raises(SolverError, match="feasible averages are 4 to 10"):
        search(toy_objective, info=INFO, average_budget=25, policies=POLICIES, total=100, floor=4, cap=10)
