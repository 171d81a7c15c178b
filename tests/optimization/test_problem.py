"""The problem: preprocessing (monotone curves, dominated options, kept levels), interpolation, input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polykv_search.calibration.profile import PROFILE_FORMAT, PROFILE_VERSION, Profile
from polykv_search.errors import ConfigError, ProfileError, SolverError
from polykv_search.models import ModelInfo
from polykv_search.optimization import Problem, solve
from polykv_search.optimization.problem import frontier


def _problem(costs, grid=(16, 32, 64, 128), **kw):
    costs = np.asarray(costs, dtype=float)
    kw.setdefault("total", grid[0] * costs.shape[0])
    return Problem(costs, grid, range(costs.shape[0]), [f"p{i}" for i in range(costs.shape[1])], **kw)


def test_curves_are_made_monotone_by_running_minimum():
    problem = _problem([[[5.0, 3.0, 4.0, 1.0], [2.0, 2.5, 2.5, 0.5]]])
    np.testing.assert_array_equal(problem.prepared.curves[0], [[5, 3, 3, 1], [2, 2, 2, 0.5]])


@settings(max_examples=200, deadline=None)
@given(values=st.lists(st.integers(0, 4), min_size=12, max_size=12), mask=st.lists(st.booleans(), min_size=3,
                                                                                   max_size=3))
def test_frontier_keeps_exactly_the_non_dominated_options(values, mask):
    curves = np.asarray(values, dtype=float).reshape(1, 3, 4)  # (J, P, K) with many exact ties
    levels = np.asarray([10, 20, 30, 40])
    mask = np.asarray(mask)
    if not mask.any():
        mask[0] = True
    (opts,) = frontier(curves, levels, mask)
    allowed = [(p, k) for p in range(3) for k in range(4) if mask[p]]

    def dominated(p, k):
        return any((levels[k2] <= levels[k] and curves[0, p2, k2] <= curves[0, p, k])
                   and (levels[k2] < levels[k] or curves[0, p2, k2] < curves[0, p, k] or p2 < p)
                   for p2, k2 in allowed if (p2, k2) != (p, k))

    expected = {(p, k) for p, k in allowed if not dominated(p, k)}
    assert set(zip(opts.policy.tolist(), opts.level.tolist())) == expected
    np.testing.assert_array_equal(opts.budget, levels[opts.level])  # the mapping back to (policy, budget)
    np.testing.assert_array_equal(opts.cost, curves[0, opts.policy, opts.level])
    assert np.all(np.diff(opts.budget) > 0) and np.all(np.diff(opts.cost) < 0)


def test_levels_outside_floor_and_cap_are_dropped():
    problem = _problem(np.ones((2, 1, 4)), floor=20, cap=100, total=100)
    assert problem.prepared.levels.tolist() == [32, 64]
    for solver in ("dp", "ilp"):
        alloc = solve(problem, solver=solver)
        assert alloc.total == 100 and all(32 <= b <= 64 for b in alloc.budgets)
    assert _problem(np.ones((2, 1, 4)), floor=1).prepared.levels.tolist() == [16, 32, 64, 128]


def test_interpolation_is_exact_on_levels_and_linear_between():
    problem = _problem([[[8.0, 4.0, 2.0, 1.0]]])
    prep = problem.prepared
    values = prep.interpolate(prep.curves, np.asarray([16, 24, 32, 48, 64, 96, 128]))[0, 0]
    np.testing.assert_allclose(values, [8, 6, 4, 3, 2, 1.5, 1])
    assert values[0] == 8.0 and values[2] == 4.0 and values[-1] == 1.0  # bit-exact on a level
    assert problem.objective(["p0"], [24]) == pytest.approx(6.0)


@pytest.mark.parametrize("total", [16 * 3 - 1, 128 * 3 + 1])
def test_infeasible_total_names_the_feasible_averages(total):
    with pytest.raises(SolverError, match=r"feasible averages are 16 to 128 tokens per layer"):
        _problem(np.ones((3, 2, 4)), total=total)
    with pytest.raises(SolverError, match=r"feasible averages are 32 to 64 tokens per layer"):
        _problem(np.ones((3, 2, 4)), total=total, floor=17, cap=127)


def test_tied_total_must_be_reachable():
    with pytest.raises(SolverError, match="multiple of 2; use 100 or 102"):
        Problem(np.ones((4, 1, 4)), (16, 32, 64, 128), range(4), ["a"], 101, tied=[[0, 1], [2, 3]])


@pytest.mark.parametrize("kwargs, message", [
    (dict(allowed={"zz": [0]}), "known policies: p0, p1"),
    (dict(allowed={"p1": [7]}), "not compressible"),
    (dict(tied=[[0, 1], [1, 2]]), "repeats a layer"),
    (dict(tied=[[0, 9]]), "not compressible"),
    (dict(floor=200), "no budget level"),
    (dict(floor=64, cap=32), "below floor"),
    (dict(max_policies=0), "at least 1"),
    (dict(total=50.5), "whole number"),
])
def test_bad_options_raise_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        _problem(np.ones((3, 2, 4)), **kwargs)


def test_bad_costs_raise_config_error():
    costs = np.ones((3, 2, 4))
    costs[1, 0, 2] = np.nan
    with pytest.raises(ConfigError, match="layer 1, policy 'p0', budget 64 is nan"):
        _problem(costs)
    with pytest.raises(ConfigError, match="shape"):
        Problem(np.ones((3, 2, 4)), (16, 32, 64), range(3), ["a", "b"], 48)


@pytest.mark.parametrize("solver", ["dp", "ilp"])
def test_layer_without_any_allowed_policy_is_a_config_error(solver):
    problem = _problem(np.ones((3, 2, 4)), allowed={"p0": [0], "p1": [0, 1]})
    with pytest.raises(ConfigError, match=r"layer\(s\) \[2\] have no allowed policy"):
        solve(problem, solver=solver)


def _profile(layer_types, policies=("snapkv", "tova", "knorm"), budgets=(16, 32, 64, 128), samples=2, heads=2):
    info = ModelInfo(model_id="tiny", revision="test", num_layers=len(layer_types), layer_types=list(layer_types),
                     num_heads=4, num_kv_heads=heads, head_dim=8, max_context=4096)
    gen = torch.Generator().manual_seed(0)
    shape = (samples, len(layer_types), heads, len(policies), len(budgets))
    costs = torch.rand(shape, generator=gen).sort(dim=-1, descending=True).values
    sliding = torch.tensor([t == "sliding_attention" for t in layer_types])
    costs[:, sliding] = float("nan")
    header = {"format": PROFILE_FORMAT, "format_version": PROFILE_VERSION, "model": info.to_dict(),
              "policies": [{"name": p} for p in policies], "budgets": list(budgets),
              "samples": [{"id": i} for i in range(samples)]}
    return Profile(header=header, arrays={"mass_lost": costs, "out_err": costs * 2})


def test_from_profile_takes_compressible_layers_and_chosen_policies():
    profile = _profile(["sliding_attention", "full_attention", "sliding_attention", "full_attention"])
    problem = Problem.from_profile(profile, average_budget=40.25, policies=["knorm", "snapkv"], cost="out_err")
    assert problem.layers == (1, 3) and problem.policies == ("knorm", "snapkv")
    assert problem.total == 81  # 40.25 x 2 = 80.5, rounded half up
    expected = profile.layer_costs("out_err").double().numpy()[[1, 3]][:, [2, 0]]
    np.testing.assert_allclose(problem.costs, expected)
    for solver in ("dp", "ilp"):
        alloc = solve(problem, solver=solver)
        assert [layer.index for layer in alloc.layers] == [1, 3] and alloc.total == 81


def test_from_profile_unknown_policy_lists_the_known_ones():
    profile = _profile(["full_attention"] * 2)
    with pytest.raises(ConfigError, match="known policies: snapkv, tova, knorm"):
        Problem.from_profile(profile, average_budget=64, policies=["snapkv", "h2o"])
    with pytest.raises(ConfigError, match="positive number"):
        Problem.from_profile(profile, average_budget=-1)


def test_equal_weighting_makes_a_sample_count_the_same_whatever_its_cost_scale():
    profile = _profile(["sliding_attention", "full_attention", "full_attention"], samples=2)
    mean = profile.layer_costs("mass_lost")
    scaled = Profile(header=profile.header, arrays={k: v.clone() for k, v in profile.arrays.items()})
    scaled.arrays["mass_lost"][0] *= 100.0  # sample 0: a long answer, every cost 100x larger
    assert not torch.allclose(scaled.layer_costs("mass_lost"), mean, equal_nan=True)  # the plain mean is swamped
    torch.testing.assert_close(scaled.layer_costs("mass_lost", "equal"), profile.layer_costs("mass_lost", "equal"),
                               equal_nan=True)
    # each sample divided by its mean over compressible layers and policies at the lowest level, then averaged
    per_sample = profile.arrays["mass_lost"].mean(dim=2)[:, 1:]  # (N, L_c, P, G)
    expected = (per_sample / per_sample[..., 0].mean(dim=(1, 2))[:, None, None, None]).mean(dim=0)
    torch.testing.assert_close(profile.layer_costs("mass_lost", "equal")[1:], expected)
    assert torch.isnan(profile.layer_costs("mass_lost", "equal")[0]).all()  # sliding layer stays out
    problem = Problem.from_profile(profile, average_budget=32, weighting="equal")
    np.testing.assert_allclose(problem.costs, expected.double().numpy(), rtol=1e-6)
    with pytest.raises(ProfileError, match="unknown sample weighting 'median'"):
        profile.layer_costs("mass_lost", "median")
