"""Random allocation problems and an independent brute force that enumerates every integer plan."""

from __future__ import annotations

import itertools
import math

import numpy as np
from hypothesis import strategies as st

from polykv_search.optimization import Allocation, Problem


@st.composite
def small_problems(draw, *, max_layers: int = 3, max_policies: int = 2, max_levels: int = 4, extras: bool = True):
    """Problems small enough to enumerate: a few layers, policies and levels on budgets up to 12."""
    n_layers = draw(st.integers(1, max_layers))
    n_pol = draw(st.integers(1, max_policies))
    grid = sorted(draw(st.sets(st.integers(1, 12), min_size=1, max_size=max_levels)))
    costs = np.asarray(draw(st.lists(st.floats(0, 10, allow_nan=False), min_size=n_layers * n_pol * len(grid),
                                     max_size=n_layers * n_pol * len(grid)))).reshape(n_layers, n_pol, len(grid))
    layers = sorted(draw(st.sets(st.integers(0, 40), min_size=n_layers, max_size=n_layers)))
    names = [f"p{i}" for i in range(n_pol)]
    floor = draw(st.sampled_from([1, grid[0], grid[len(grid) // 2]]))
    cap = draw(st.sampled_from([None, grid[-1], grid[len(grid) // 2] + 1]))
    if cap is not None and cap < floor:
        cap = None
    kept = [g for g in grid if g >= floor and (cap is None or g <= cap)]
    allowed = tied = limit = None
    if extras and draw(st.booleans()):
        allowed = {name: draw(st.lists(st.sampled_from(layers), unique=True)) for name in names[1:]}
    if extras and n_layers > 1 and draw(st.booleans()):
        order = draw(st.permutations(layers))
        cut = draw(st.integers(2, n_layers))
        tied = [sorted(order[:cut])]
    if extras and n_pol > 1 and draw(st.booleans()):
        limit = 1
    total = draw(st.integers(kept[0] * n_layers, kept[-1] * n_layers))
    return dict(costs=costs, budgets=grid, layers=layers, policies=names, total=total, floor=floor, cap=cap,
                allowed=allowed, tied=tied, max_policies=limit)


def brute_force(spec: dict) -> tuple[float, list[str], list[int]] | None:
    """Best plan over every policy and every integer budget of every layer, straight from the definition."""
    grid = np.asarray(spec["budgets"])
    keep = (grid >= spec["floor"]) & (grid <= (spec["cap"] or grid[-1]))
    levels, layers, names = grid[keep], list(spec["layers"]), list(spec["policies"])
    curves = np.minimum.accumulate(spec["costs"][:, :, keep], axis=2)  # (L, P, K)
    budgets = range(int(levels[0]), int(levels[-1]) + 1)
    allowed = spec["allowed"] or {}
    groups = [list(g) for g in spec["tied"] or []]
    groups += [[lay] for lay in layers if not any(lay in g for g in groups)]
    per_group = []  # every (policy, budget, cost) a group may take
    for g in groups:
        opts = []
        for p, name in enumerate(names):
            if name in allowed and not all(lay in allowed[name] for lay in g):
                continue
            for b in budgets:
                cost = sum(float(np.interp(b, levels, curves[layers.index(lay), p])) for lay in g)
                opts.append((name, b, cost))
        per_group.append(opts)
    best = None
    for combo in itertools.product(*per_group):
        if sum(b * len(g) for (_, b, _), g in zip(combo, groups)) != spec["total"]:
            continue
        if spec["max_policies"] is not None and len({name for name, _, _ in combo}) > spec["max_policies"]:
            continue
        value = sum(c for _, _, c in combo)
        if best is None or value < best[0]:
            plan = {lay: (name, b) for (name, b, _), g in zip(combo, groups) for lay in g}
            best = (value, [plan[lay][0] for lay in layers], [plan[lay][1] for lay in layers])
    return best


def check_plan(problem: Problem, alloc: Allocation) -> None:
    """Every output: one choice per compressible layer, exact total, within floor/cap, every constraint kept."""
    assert [layer.index for layer in alloc.layers] == list(problem.layers)
    assert alloc.total == problem.total
    assert all(isinstance(b, int) for b in alloc.budgets)
    cap = problem.cap if problem.cap is not None else math.inf
    assert all(problem.floor <= b <= cap and problem.budgets[0] <= b <= problem.budgets[-1] for b in alloc.budgets)
    assert problem.violations(alloc.policies, alloc.budgets) == []
    assert math.isclose(alloc.objective, problem.objective(alloc.policies, alloc.budgets), rel_tol=1e-12)
    assert alloc.bound <= alloc.objective + 1e-12 and alloc.gap >= 0


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-6 * max(abs(a), abs(b)) + 1e-9
