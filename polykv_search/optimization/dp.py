"""Exact dynamic programming for the allocation problem: min-plus convolutions over the budget axis, one
(super-)layer at a time, vectorised in numpy. See `solve_dp` for why a grid-sized state space is exact.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from polykv_search.errors import ConfigError, SolverError
from polykv_search.optimization.allocation import OPTIMAL, Allocation, assemble, distribute
from polykv_search.optimization.problem import Options, Prepared, Problem, frontier

logger = logging.getLogger(__name__)

MAX_SUBSETS = 256  # max_policies: the dp solves once per subset of policies, so it refuses more than this
CHUNK = 1 << 22  # cells of one (states x shifts) block: bounds the temporary to 32 MB


def solve_dp(problem: Problem) -> Allocation:
    """The exact optimum of `problem` by dynamic programming; `max_policies` is met by solving once per subset.

    Why a grid-sized state space is exact: budgets are integers and costs are linear between grid levels, so if
    two groups of the same tie size sit strictly between levels, moving tokens from one to the other changes
    the cost linearly and one direction loses nothing until one of them reaches a level. Hence an optimum
    exists with at most one off-grid ("free") group per tie size. Table A runs over sums of grid levels in
    units of their gcd; table B has the free group used, at offsets that keep the residue of the total. The
    dp solves "sum <= total" (the same optimum, as costs never rise with budget), which lets dominated options
    go, and pads the slack at no cost. Tie groups of several sizes: each size is solved for every sum (one B
    table per residue, so about `unit` times the work) and the sizes' sums are combined exactly.
    """
    start = time.perf_counter()
    prep = problem.prepared
    usable = np.isfinite(prep.group_curves[:, :, 0]).any(axis=0)  # (P,) policies allowed in some layer
    value, policy, budget = _solve_masked(problem, usable)
    subsets = 1
    limit = problem.max_policies
    if limit is not None and len({int(p) for p in policy}) > limit:
        candidates = np.flatnonzero(usable)
        subsets = math.comb(len(candidates), limit)
        if subsets > MAX_SUBSETS:
            raise ConfigError(f"max_policies {limit} over {len(candidates)} policies means {subsets} subsets "
                              f"(the dp solver tries at most {MAX_SUBSETS}); use --solver ilp")
        value = math.inf
        for subset in combinations(candidates, limit):
            mask = np.zeros_like(usable)
            mask[list(subset)] = True
            result = _solve_masked(problem, mask)
            if result[0] < value:
                value, policy, budget = result
    if not math.isfinite(value):
        raise SolverError(problem.infeasible_message())
    seconds = time.perf_counter() - start
    alloc = assemble(problem, policy, budget, solver="dp", status=OPTIMAL, bound=None, seconds=seconds,
                     info={"unit": prep.unit, "subsets": subsets, "dp_value": float(value)})
    logger.info("dp: optimal objective %.6g in %.3f s", alloc.objective, seconds)
    return alloc


def _solve_masked(problem: Problem, mask: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Optimum using only the policies in `mask` (P,): value, policy (J,) and budget (J,) per group."""
    prep = problem.prepared
    options = prep.options if mask.all() else frontier(prep.group_curves, prep.levels, mask)
    n_groups = len(prep.groups)
    policy, budget = np.zeros(n_groups, dtype=np.int64), np.full(n_groups, prep.lo, dtype=np.int64)
    if any(len(o.cost) == 0 for o in options):
        return math.inf, policy, budget
    extra = problem.total - int(prep.mult.sum()) * prep.lo  # tokens above the lowest level, over all layers
    classes: dict[int, list[int]] = {}
    for j, m in enumerate(prep.mult):
        classes.setdefault(int(m), []).append(j)
    if len(classes) == 1:
        ((m, members),) = classes.items()
        dp = _ClassDP(prep, members, options, mask, extra // m, residues=[(extra // m) % prep.unit])
        sigmas = {m: extra // m}
        value = float(dp.best[-1])
        solvers = {m: dp}
    else:
        solvers = {m: _ClassDP(prep, members, options, mask, min(len(members) * prep.span, extra // m),
                               residues=range(prep.unit)) for m, members in classes.items()}
        value, sigmas = _combine({m: dp.best for m, dp in solvers.items()}, extra)
    if not math.isfinite(value):
        return math.inf, policy, budget
    for m, dp in solvers.items():
        used = dp.backtrack(sigmas[m], policy, budget)
        distribute(prep, classes[m], policy, budget, sigmas[m] - used)
    return value, policy, budget


@dataclass
class _Free:
    """Off-grid candidates of one group for one residue: offsets residue + unit * shift."""

    shift: np.ndarray
    cost: np.ndarray
    policy: np.ndarray


class _ClassDP:
    """Tables over budget sums (in budget units above the lowest level) for groups of one tie size.

    A[i][a]: best cost of the first i groups all on grid levels, summing exactly a * unit.
    B[r][i][b]: the same with one group off-grid, summing exactly r + b * unit.
    `best[s]` is the best cost with sum <= s, for 0 <= s <= sigma_max.
    """

    def __init__(self, prep: Prepared, members: Sequence[int], options: Sequence[Options], mask: np.ndarray,
                 sigma_max: int, residues: Sequence[int]) -> None:
        self.prep, self.members, unit = prep, list(members), prep.unit
        self.grid = [((options[j].budget - prep.lo) // unit, options[j].cost, options[j].policy) for j in members]
        size_a = sigma_max // unit + 1
        self.a = [np.zeros(1)]
        for shift, cost, _ in self.grid:
            self.a.append(_minplus(self.a[-1], shift, cost, size_a))
        free = self._free_candidates(mask, sigma_max, residues)
        self.b: dict[int, list[np.ndarray]] = {}
        self.free: dict[int, list[_Free]] = {}
        for r in residues:
            if r > sigma_max or all(len(f.cost) == 0 for f in free[r]):
                continue
            size_b = (sigma_max - r) // unit + 1
            tables = [np.zeros(0)]
            for i, (shift, cost, _) in enumerate(self.grid):
                stay = _minplus(tables[-1], shift, cost, size_b)  # the free group came earlier
                enter = _minplus(self.a[i], free[r][i].shift, free[r][i].cost, size_b)  # this group is free
                tables.append(_elementwise_min(stay, enter))
            self.b[r], self.free[r] = tables, free[r]
        # best cost with sum <= s: merge both tables onto the budget axis, then a running minimum
        merged = np.full(sigma_max + 1, np.inf)
        source = np.full(sigma_max + 1, -1)  # -1: table A, r: table B[r]
        last = self.a[-1]
        merged[np.arange(len(last)) * unit] = last
        for r, tables in self.b.items():
            at = r + np.arange(len(tables[-1])) * unit
            better = tables[-1] < merged[at]
            merged[at[better]], source[at[better]] = tables[-1][better], r
        self.best = np.minimum.accumulate(merged)  # (sigma_max + 1,)
        hit = np.where(merged == self.best, np.arange(sigma_max + 1), -1)
        self.argbest = np.maximum.accumulate(hit)  # where the running minimum was attained
        self.source = source

    def _free_candidates(self, mask: np.ndarray, sigma_max: int, residues: Sequence[int]) -> dict[int, list[_Free]]:
        prep, unit = self.prep, self.prep.unit
        curves = np.where(mask[None, :, None], prep.group_curves[self.members], np.inf)  # (J_c, P, K)
        out: dict[int, list[_Free]] = {}
        for r in residues:
            offsets = np.arange(r, min(prep.span, sigma_max) + 1, unit)  # (n,) tokens above the lowest level
            values = prep.interpolate(curves, prep.lo + offsets)  # (J_c, P, n)
            env, arg = values.min(axis=1), values.argmin(axis=1)  # (J_c, n): best policy at each budget
            out[r] = []
            for i, (shift, cost, _) in enumerate(self.grid):
                # useless unless cheaper than every grid option and free budget below it (the sum is <= total)
                grid_best = cost[np.searchsorted(shift * unit, offsets, side="right") - 1]  # (n,)
                before = np.concatenate([[np.inf], np.minimum.accumulate(env[i])[:-1]])
                keep = (env[i] < grid_best) & (env[i] < before)
                out[r].append(_Free(shift=(offsets[keep] - r) // unit, cost=env[i][keep], policy=arg[i][keep]))
        return out

    def backtrack(self, sigma: int, policy: np.ndarray, budget: np.ndarray) -> int:
        """Write the choices behind best[sigma] into policy/budget (per group); return the units used."""
        prep, unit = self.prep, self.prep.unit
        at = int(self.argbest[sigma])
        r = int(self.source[at])
        state = (at - r) // unit if r >= 0 else at // unit
        for i in range(len(self.members) - 1, -1, -1):
            j = self.members[i]
            shift, cost, pol = self.grid[i]
            if r >= 0:  # in table B[r]: group i was either on the grid (B before) or the free one (A before)
                stay = _at(self.b[r][i], state - shift) + cost
                free = self.free[r][i]
                enter = _at(self.a[i], state - free.shift) + free.cost
                if len(enter) and enter.min() < stay.min():
                    k = int(enter.argmin())
                    policy[j], budget[j] = free.policy[k], prep.lo + r + unit * free.shift[k]
                    state, r = state - int(free.shift[k]), -1
                    continue
            else:
                stay = _at(self.a[i], state - shift) + cost
            k = int(stay.argmin())
            policy[j], budget[j] = pol[k], prep.lo + unit * shift[k]
            state -= int(shift[k])
        return int(sum(budget[j] - prep.lo for j in self.members))


def _combine(best: dict[int, np.ndarray], extra: int) -> tuple[float, dict[int, int]]:
    """Split `extra` tokens between tie sizes m (sum of m * sigma_m == extra) at least total cost."""
    order = sorted(best, key=lambda m: -len(best[m]))  # the longest table seeds, the last one is read at one point
    first, *middle, last = order
    table = np.full(extra + 1, np.inf)
    reach = np.arange(len(best[first])) * first
    table[reach[reach <= extra]] = best[first][reach <= extra]
    tables = [table]
    for m in middle:
        h = best[m]
        ok = np.isfinite(h)
        tables.append(_minplus(tables[-1], np.flatnonzero(ok) * m, h[ok], extra + 1))
    sigma = np.arange(len(best[last]))
    vals = _at(tables[-1], extra - last * sigma) + best[last]
    if not np.isfinite(vals).any():
        return math.inf, {}
    k = int(vals.argmin())
    sigmas, rest = {last: k}, extra - last * k
    for m, prev in zip(reversed(middle), reversed(tables[:-1])):
        h = best[m]
        k = int((_at(prev, rest - m * np.arange(len(h))) + h).argmin())
        sigmas[m], rest = k, rest - m * k
    sigmas[first] = rest // first
    return float(vals.min()), sigmas


def _minplus(prev: np.ndarray, shifts: np.ndarray, costs: np.ndarray, size: int) -> np.ndarray:
    """out[s] = min_k prev[s - shifts[k]] + costs[k], for s below min(size, len(prev) + max shift): a min-plus
    convolution as one broadcast over a sliding-window view (no loop over budget values)."""
    if len(shifts) == 0 or len(prev) == 0:
        return np.zeros(0)
    width = int(shifts.max()) + 1
    n = min(size, len(prev) + width - 1)
    kernel = np.full(width, np.inf)
    np.minimum.at(kernel, width - 1 - shifts, costs)  # kernel[i]: cost of shifting by width - 1 - i
    padded = np.concatenate([np.full(width - 1, np.inf), prev[:n], np.full(max(0, n - len(prev)), np.inf)])
    windows = sliding_window_view(padded, width)  # (n, width): windows[s, i] = prev[s - (width - 1 - i)]
    out = np.empty(n)
    rows = max(1, CHUNK // width)
    for lo in range(0, n, rows):
        out[lo:lo + rows] = (windows[lo:lo + rows] + kernel).min(axis=1)
    return out


def _elementwise_min(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    out = np.full(max(len(x), len(y)), np.inf)
    out[:len(x)] = x
    out[:len(y)] = np.minimum(out[:len(y)], y)
    return out


def _at(table: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """table[idx] with +inf outside the table."""
    idx = np.asarray(idx)
    inside = (idx >= 0) & (idx < len(table))
    return np.where(inside, table[np.clip(idx, 0, max(len(table) - 1, 0))] if len(table) else np.inf, np.inf)
