"""Baseline allocators (uniform, PyramidKV, CAKE) and the shared rounding: exact sums, floors and caps, pyramid shape, CAKE preferences."""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kvpress import PyramidKVPress

from polykv_search.errors import ConfigError, ProfileError
from polykv_search.optimization import cake_plan, cake_preferences, pyramidkv_plan
from polykv_search.plan import (
    PlanFile,
    budget_total,
    exact_integer_budgets,
    uniform_plan,
    validate_plan_json,
)
from tests.plan.factories import (
    FULL,
    SLIDING,
    gemma_like,
    llama_like,
    make_profile,
    with_layer_types,
)

LAYER_TYPES = st.lists(st.sampled_from([FULL, FULL, SLIDING]), min_size=1, max_size=80).filter(
    lambda types: FULL in types)


def compressible_budgets(plan):
    return [b for b in plan.budgets if b is not None]


def assert_valid_and_exact(info, plan, budget):
    n = len(info.compressible_layers)
    assert sum(compressible_budgets(plan)) == budget_total(budget, n) == plan.constraint.total
    assert min(compressible_budgets(plan)) >= 1
    assert validate_plan_json(PlanFile.build(info, [plan]).to_dict(), model=info) == []


# -- exact_integer_budgets ---------------------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(weights=st.lists(st.floats(0, 1e6, allow_nan=False), min_size=1, max_size=60),
       floor=st.integers(0, 5), extra=st.integers(0, 100_000), cap=st.none() | st.integers(5, 5000))
def test_rounding_is_exact_within_floors_and_caps(weights, floor, extra, cap):
    n = len(weights)
    total = n * floor + extra
    if cap is not None and total > n * cap:
        with pytest.raises(ConfigError, match="exceeds what"):
            exact_integer_budgets(weights, total, floor=floor, cap=cap)
        return
    out = exact_integer_budgets(weights, total, floor=floor, cap=cap)
    assert sum(out) == total and len(out) == n
    assert all(floor <= b <= (cap if cap is not None else total) for b in out)
    # the order of the weights is kept: a larger weight never gets fewer tokens
    for i in range(n):
        for j in range(n):
            if weights[i] > weights[j]:
                assert out[i] >= out[j], (weights, out)


@settings(max_examples=300, deadline=None)
@given(weights=st.lists(st.floats(0.01, 100, allow_nan=False), min_size=1, max_size=60),
       total=st.integers(0, 200_000))
def test_rounding_is_proportional_when_no_bound_binds(weights, total):
    shares = [total * w / sum(weights) for w in weights]
    out = exact_integer_budgets(weights, total, floor=0)
    assert sum(out) == total
    assert all(abs(b - s) < 1 + 1e-9 for b, s in zip(out, shares)), (shares, out)


def test_rounding_floors_caps_and_redistribution():
    assert exact_integer_budgets([1, 1, 1], 10) == [4, 3, 3]
    assert exact_integer_budgets([0, 0, 0], 7) == [3, 2, 2]  # all-zero weights split evenly
    assert exact_integer_budgets([100, 1, 1], 30, floor=5) == [20, 5, 5]  # floors bind, the rest follows weight
    assert exact_integer_budgets([100, 1, 1], 30, cap=12) == [12, 9, 9]  # capped excess goes to the others
    assert exact_integer_budgets([1, 0], 9, cap=5) == [5, 4]  # a zero weight takes what the capped one cannot
    assert exact_integer_budgets([3, 1], 8, cap=[4, 10]) == [4, 4]
    assert exact_integer_budgets([], 0) == []


@pytest.mark.parametrize(("weights", "total", "kwargs", "message"), [
    ([1, 1], 1, {}, "cannot give 2 layers at least 1 token"),
    ([1, 1], 11, {"cap": 5}, "exceeds what 2 layers can hold"),
    ([1, -1], 4, {}, "must be finite and >= 0"),
    ([1, math.nan], 4, {}, "must be finite and >= 0"),
    ([1, 1], 4.5, {}, "is not an integer"),
    ([1, 1], 4, {"cap": [3]}, "1 caps given for 2 weights"),
    ([], 3, {}, "over zero layers"),
])
def test_rounding_refuses_impossible_splits(weights, total, kwargs, message):
    with pytest.raises(ConfigError, match=message):
        exact_integer_budgets(weights, total, **kwargs)


# -- uniform -----------------------------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(types=LAYER_TYPES, budget=st.integers(1, 8192) | st.floats(1, 4096, allow_nan=False))
def test_uniform_is_exact_and_valid(types, budget):
    info = with_layer_types(types)
    plan = uniform_plan(info, policy="knorm", budget=budget)
    assert_valid_and_exact(info, plan, budget)
    assert max(compressible_budgets(plan)) - min(compressible_budgets(plan)) <= 1
    assert plan.search.solver == "uniform"


def test_uniform_rejects_bad_budget_and_policy():
    with pytest.raises(ConfigError, match="--budget 0 must be at least 1"):
        uniform_plan(llama_like(), policy="snapkv", budget=0)
    with pytest.raises(ConfigError, match="unknown policy 'snap'"):
        uniform_plan(llama_like(), policy="snap", budget=64)


# -- PyramidKV ---------------------------------------------------------------------------------------
@settings(max_examples=100, deadline=None)
@given(types=LAYER_TYPES, budget=st.integers(1, 8192), window=st.integers(0, 128), beta=st.integers(1, 40))
def test_pyramid_is_exact_valid_and_non_increasing(types, budget, window, beta):
    info = with_layer_types(types)
    plan = pyramidkv_plan(info, budget=budget, window=window, beta=beta)
    assert_valid_and_exact(info, plan, budget)
    values = compressible_budgets(plan)
    assert all(a >= b for a, b in itertools.pairwise(values)), values


def test_pyramid_shape_on_30_layers():
    plan = pyramidkv_plan(llama_like(), budget=512)
    values = plan.budgets
    assert values[0] == 938 and values[-1] == 86  # 64 + 2*448 - 22.4 down to 64 + 448/20
    assert values[0] > values[15] > values[-1]
    assert plan.search.notes == "pyramidkv window=64 beta=20"


def test_pyramid_skips_sliding_layers_and_falls_back_to_uniform_at_small_budgets():
    info = gemma_like()
    plan = pyramidkv_plan(info, budget=1000)
    assert compressible_budgets(plan)[0] > compressible_budgets(plan)[-1]
    assert [b is None for b in plan.budgets] == [t == SLIDING for t in info.layer_types]
    small = pyramidkv_plan(llama_like(), budget=64, window=64)
    assert set(small.budgets) == {64} and "uniform" in small.search.notes


@pytest.mark.parametrize(("budget", "context"), [(512, 100_000), (1024, 8192), (300, 2000), (1500, 2000)])
def test_pyramid_with_no_window_matches_kvpress(budget, context):
    """window=0 reproduces kvpress's PyramidKVPress budgets, including its cap at the context length."""
    layers = 30
    press = PyramidKVPress(compression_ratio=1 - budget / context, window_size=0, beta=20)
    expected = [press.get_layer_budget(SimpleNamespace(config=SimpleNamespace(num_hidden_layers=layers),
                                                       layer_idx=i), context) for i in range(layers)]
    plan = pyramidkv_plan(llama_like(layers), budget=budget, window=0, max_budget=context)
    assert all(abs(a - b) <= 1 for a, b in zip(plan.budgets, expected)), (plan.budgets, expected)
    assert sum(plan.budgets) == budget * layers


def test_pyramid_cap_holds():
    plan = pyramidkv_plan(llama_like(), budget=1500, max_budget=2000)
    assert max(plan.budgets) <= 2000 and sum(plan.budgets) == 1500 * 30
    with pytest.raises(ConfigError, match="--max-budget 100 is below the average budget 512"):
        pyramidkv_plan(llama_like(), budget=512, max_budget=100)


# -- CAKE --------------------------------------------------------------------------------------------
def test_cake_follows_preferences():
    info = llama_like(6)
    entropy, variance = [1.0, 2.0, 3.0, 1.0, 2.0, 4.0], [0.5, 0.5, 0.5, 2.0, 1.0, 1.0]
    profile = make_profile(info, entropy=entropy, variance=variance)
    plan = cake_plan(info, profile, budget=100, profile_signature="d" * 64)
    preference = [h * v for h, v in zip(entropy, variance)]  # P = H * V at tau = 1
    shares = [600 * p / sum(preference) for p in preference]
    assert all(abs(b - s) < 1 for b, s in zip(plan.budgets, shares)), (plan.budgets, shares)
    assert_valid_and_exact(info, plan, 100)
    assert plan.search.solver == "cake" and plan.search.profile_signature == "d" * 64


def test_cake_temperatures_flatten_or_sharpen():
    info = llama_like(4)
    profile = make_profile(info, entropy=[1.0, 2.0, 4.0, 8.0], variance=[1.0] * 4)
    budgets = {tau: cake_plan(info, profile, budget=200, tau1=tau).budgets for tau in (0.5, 1.0, 4.0)}
    spread = {tau: max(values) - min(values) for tau, values in budgets.items()}
    assert spread[0.5] > spread[1.0] > spread[4.0]
    assert cake_preferences(info, profile, tau1=0.5) == pytest.approx([1.0, 4.0, 16.0, 64.0])


def test_cake_ignores_sliding_layers_and_caps_with_redistribution():
    info = gemma_like()
    entropy = [float(i + 1) for i in range(18)]
    profile = make_profile(info, entropy=entropy, variance=[1.0] * 18)
    plan = cake_plan(info, profile, budget=200, max_budget=230)
    values = compressible_budgets(plan)  # layers 5, 11, 17 with preferences 6, 12, 18 -> 100, 200, 300 uncapped
    assert values == [140, 230, 230]  # the capped excess moves to the lower-preference layer
    assert_valid_and_exact(info, plan, 200)


@settings(max_examples=60, deadline=None)
@given(types=LAYER_TYPES, budget=st.integers(1, 4096), data=st.data())
def test_cake_is_exact_for_any_signals(types, budget, data):
    info = with_layer_types(types)
    values = st.floats(0, 10, allow_nan=False, width=32)
    profile = make_profile(info, entropy=data.draw(st.lists(values, min_size=len(types), max_size=len(types))),
                           variance=data.draw(st.lists(values, min_size=len(types), max_size=len(types))),
                           samples=1)
    plan = cake_plan(info, profile, budget=budget)
    assert_valid_and_exact(info, plan, budget)


def test_cake_refuses_a_profile_of_another_model_or_without_signals():
    profile = make_profile(llama_like(6), entropy=[1.0] * 6, variance=[1.0] * 6)
    with pytest.raises(ProfileError, match="calibrate this model first"):
        cake_plan(llama_like(8), profile, budget=64)
    broken = make_profile(llama_like(3), entropy=[1.0, float("nan"), 1.0], variance=[1.0] * 3)
    with pytest.raises(ProfileError, match="layer 1 are entropy=nan"):
        cake_plan(llama_like(3), broken, budget=64)
    del profile.arrays["signal.variance"]
    with pytest.raises(ProfileError, match="no variance signal"):
        cake_plan(llama_like(6), profile, budget=64)
    with pytest.raises(ConfigError, match="tau1 > 0"):
        cake_plan(llama_like(6), profile, budget=64, tau1=0)
