"""Solver behaviour: constraints kept, exact totals off the grid, honest ILP status, errors that say the fix."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from polykv_search.errors import ConfigError, SolverError
from polykv_search.optimization import OPTIMAL, TIME_LIMIT, Problem, solve
from tests.optimization.helpers import check_plan, close


def _curves(layers: int, policies: int, levels: int, *, seed: int = 0):
    rng = np.random.default_rng(seed)
    grid = 16 * np.arange(1, levels + 1)
    tau = rng.uniform(0.1, 0.5, size=(layers, policies, 1)) * grid[-1]
    costs = rng.uniform(0.5, 2, size=(layers, 1, 1)) * np.exp(-grid / tau)
    return costs, grid.tolist()


@pytest.mark.parametrize("solver", ["dp", "ilp"])
@pytest.mark.parametrize("offset", [0, 1, 7, 15])
def test_totals_off_the_grid_are_hit_exactly(solver, offset):
    costs, grid = _curves(10, 3, 12)
    problem = Problem(costs, grid, range(10), ["a", "b", "c"], 10 * 64 + offset, cap=150)
    alloc = solve(problem, solver=solver)
    check_plan(problem, alloc)
    assert alloc.total == 10 * 64 + offset and max(alloc.budgets) <= 150


@pytest.mark.parametrize("solver", ["dp", "ilp"])
def test_allowed_tied_and_max_policies_are_kept(solver):
    costs, grid = _curves(9, 4, 10, seed=3)
    names = ["a", "b", "c", "d"]
    free = Problem(costs, grid, range(9), names, 9 * 60)
    bound = Problem(costs, grid, range(9), names, 9 * 60, allowed={"a": [0, 1], "b": [2, 3, 4]},
                    tied=[[5, 6], [7, 8]], max_policies=2)
    loose, tight = solve(free, solver=solver), solve(bound, solver=solver)
    check_plan(free, loose)
    check_plan(bound, tight)
    policies = dict(zip(bound.layers, tight.policies))
    budgets = dict(zip(bound.layers, tight.budgets))
    assert all(policies[i] != "a" for i in range(2, 9)) and all(policies[i] != "b" for i in (0, 1, 5, 6, 7, 8))
    assert (policies[5], budgets[5]) == (policies[6], budgets[6]) and (policies[7], budgets[7]) == (policies[8],
                                                                                                 budgets[8])
    assert len(set(tight.policies)) <= 2
    assert tight.objective >= loose.objective - 1e-12


def test_dp_refuses_too_many_policy_subsets_and_points_to_ilp():
    costs = np.full((12, 12, 3), 2.0)
    costs[np.arange(12), np.arange(12)] = 1.0  # every layer has its own best policy
    problem = Problem(costs, [16, 32, 64], range(12), [f"p{i}" for i in range(12)], 12 * 32, max_policies=6)
    with pytest.raises(ConfigError, match="924 subsets.*--solver ilp"):
        solve(problem, solver="dp")


def test_dp_max_policies_matches_ilp_when_the_unconstrained_plan_uses_too_many():
    costs, grid = _curves(8, 5, 8, seed=5)
    problem = Problem(costs, grid, range(8), list("abcde"), 8 * 50 + 3, max_policies=2)
    dp, ilp = solve(problem, solver="dp"), solve(problem, solver="ilp")
    check_plan(problem, dp)
    check_plan(problem, ilp)
    assert dp.info["subsets"] == 10 and close(dp.objective, ilp.objective)


def test_ilp_with_a_tiny_time_limit_never_claims_an_unproven_optimum():
    costs, grid = _curves(60, 8, 96, seed=1)
    problem = Problem(costs, grid, range(60), [f"p{i}" for i in range(8)], 60 * 300 + 5)
    best = solve(problem, solver="dp").objective
    try:
        alloc = solve(problem, solver="ilp", time_limit=0.05)
    except SolverError as exc:  # no plan within the limit: said so, with the fix
        assert "time limit" in str(exc) and "--solver dp" in str(exc)
        return
    check_plan(problem, alloc)
    if alloc.status == OPTIMAL:  # HiGHS proved it in time: then it must be the optimum within the gap
        assert alloc.gap <= 1e-6 and close(alloc.objective, best)
    else:
        assert alloc.status == TIME_LIMIT and alloc.bound <= best + 1e-9 and alloc.objective >= best - 1e-9


def test_ilp_reports_a_limit_status_from_highs_even_with_a_good_plan(monkeypatch):
    """HiGHS's own status decides: a limit hit is reported as time_limit, whatever the plan looks like."""
    from cvxpy.reductions.solvers.conic_solvers.highs_conif import HIGHS as ConicHighs
    from cvxpy.reductions.solvers.qp_solvers.highs_qpif import HIGHS as QpHighs

    for cls in (ConicHighs, QpHighs):
        original = cls.solve_via_data

        def limited(self, *args, _original=original, **kwargs):
            results = _original(self, *args, **kwargs)
            results["model_status"] = "kTimeLimit"
            return results

        monkeypatch.setattr(cls, "solve_via_data", limited)
    costs, grid = _curves(6, 2, 6)
    problem = Problem(costs, grid, range(6), ["a", "b"], 6 * 40)
    alloc = solve(problem, solver="ilp")
    check_plan(problem, alloc)
    assert alloc.status == TIME_LIMIT and alloc.info["cvxpy_status"] == "user_limit"


def test_ilp_without_cvxpy_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cvxpy", None)
    problem = Problem(np.ones((2, 1, 2)), [16, 32], range(2), ["a"], 48)
    with pytest.raises(SolverError, match="pip install cvxpy highspy"):
        solve(problem, solver="ilp")


def test_unknown_solver_and_bad_ilp_options():
    problem = Problem(np.ones((2, 1, 2)), [16, 32], range(2), ["a"], 48)
    with pytest.raises(ConfigError, match="not one of dp, ilp"):
        solve(problem, solver="optuna")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="--time-limit 0 must be positive and --gap"):
        solve(problem, solver="ilp", time_limit=0)


def test_allocation_is_plain_data():
    costs, grid = _curves(4, 2, 5)
    problem = Problem(costs, grid, [1, 3, 5, 7], ["a", "b"], 4 * 33)
    for solver in ("dp", "ilp"):
        alloc = solve(problem, solver=solver)
        data = json.loads(json.dumps(alloc.to_dict()))
        assert [c["index"] for c in data["layers"]] == [1, 3, 5, 7] and data["status"] == OPTIMAL
        assert data["solver"] == solver and data["gap"] <= 1e-6


@pytest.mark.parametrize("solver", ["dp", "ilp"])
def test_constraints_that_exclude_every_plan_are_named(solver):
    costs, grid = _curves(4, 2, 4)
    problem = Problem(costs, grid, range(4), ["a", "b"], 4 * 40, allowed={"a": [0, 1], "b": [2, 3]}, max_policies=1)
    with pytest.raises(SolverError, match="1 policies must cover every layer's allowed policies"):
        solve(problem, solver=solver)
    # groups of 2 and 3 layers with budgets 16 or 17 reach 80, 82, 83, 85 but not 81
    tied = Problem(np.ones((5, 1, 2)), [16, 17], range(5), ["a"], 81, tied=[[0, 1], [2, 3, 4]])
    with pytest.raises(SolverError, match=r"tied groups of sizes \[2, 3\] must add up to exactly 81"):
        solve(tied, solver=solver)
