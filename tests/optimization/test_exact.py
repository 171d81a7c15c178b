"""Both solvers against brute force on small problems, and against each other on larger random ones."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polykv_search.errors import ConfigError, SolverError
from polykv_search.optimization import OPTIMAL, Problem, solve
from tests.optimization.helpers import brute_force, check_plan, close, small_problems

SLOW = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _solve_or_error(spec: dict, solver: str):
    try:
        problem = Problem(**spec)
        return problem, solve(problem, solver=solver)
    except (ConfigError, SolverError) as exc:
        return None, exc


@pytest.mark.parametrize("solver", ["dp", "ilp"])
@SLOW
@given(spec=small_problems())
def test_matches_brute_force(solver, spec):
    expected = brute_force(spec)
    problem, result = _solve_or_error(spec, solver)
    if expected is None:
        assert isinstance(result, (ConfigError, SolverError)), "brute force finds no plan, the solver did"
        return
    assert problem is not None, f"solver refused a feasible problem: {result}"
    check_plan(problem, result)
    assert result.status == OPTIMAL
    assert close(result.objective, expected[0]), (result.budgets, result.policies, expected)


@pytest.mark.parametrize("solver", ["dp", "ilp"])
def test_three_layers_two_policies_four_levels_every_total(solver):
    rng = np.random.default_rng(7)
    costs = np.sort(rng.random((3, 2, 4)), axis=2)[:, :, ::-1] + rng.random((3, 2, 4)) * 0.05  # not monotone
    for total in range(2 * 3, 9 * 3 + 1):
        spec = dict(costs=costs, budgets=[2, 3, 5, 9], layers=[0, 1, 2], policies=["a", "b"], total=total,
                    floor=1, cap=None, allowed=None, tied=None, max_policies=None)
        problem = Problem(**spec)
        alloc = solve(problem, solver=solver)
        check_plan(problem, alloc)
        assert close(alloc.objective, brute_force(spec)[0])


@st.composite
def larger_problems(draw):
    n_layers = draw(st.integers(2, 12))
    n_pol = draw(st.integers(1, 4))
    n_lev = draw(st.integers(1, 10))
    step = draw(st.sampled_from([1, 4, 16]))
    grid = sorted(draw(st.sets(st.integers(1, 40), min_size=n_lev, max_size=n_lev)))
    grid = [g * step for g in grid]
    seed = draw(st.integers(0, 10_000))
    rng = np.random.default_rng(seed)
    tau = rng.uniform(0.1, 1.0, size=(n_layers, 1, 1)) * grid[-1]
    tau = tau * (1 + 0.02 * rng.standard_normal((n_layers, n_pol, 1)))  # near ties
    costs = rng.uniform(0.5, 5, size=(n_layers, 1, 1)) * np.exp(-np.asarray(grid) / tau)
    costs = costs * (1 + 0.01 * rng.standard_normal(costs.shape))
    layers = list(range(n_layers))
    names = [f"p{i}" for i in range(n_pol)]
    tied = allowed = limit = None
    if draw(st.booleans()):
        tied = [layers[:2]] + ([layers[2:5]] if n_layers >= 6 and draw(st.booleans()) else [])
    if n_pol > 1 and draw(st.booleans()):
        allowed = {names[-1]: layers[: n_layers // 2]}
    if n_pol > 2 and draw(st.booleans()):
        limit = draw(st.integers(1, n_pol - 1))
    total = draw(st.integers(grid[0] * n_layers, grid[-1] * n_layers))
    return dict(costs=costs, budgets=grid, layers=layers, policies=names, total=total, tied=tied,
                allowed=allowed, max_policies=limit)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=larger_problems())
def test_dp_and_ilp_agree(spec):
    dp_problem, dp = _solve_or_error(spec, "dp")
    ilp_problem, ilp = _solve_or_error(spec, "ilp")
    if dp_problem is None or ilp_problem is None:  # both refuse, with the same kind of reason
        assert type(dp) is type(ilp), (dp, ilp)
        return
    check_plan(dp_problem, dp)
    check_plan(ilp_problem, ilp)
    assert ilp.status == OPTIMAL
    assert close(dp.objective, ilp.objective), (dp.objective, ilp.objective)
