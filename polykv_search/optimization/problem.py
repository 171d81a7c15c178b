"""The allocation problem: one policy and one integer budget per compressible layer, budgets summing exactly to a
total, cost = sum of per-layer predicted losses, linear between the grid levels of each (layer, policy) curve.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property, reduce
from typing import TYPE_CHECKING

import numpy as np

from polykv_search.errors import ConfigError, SolverError

if TYPE_CHECKING:
    from polykv_search.calibration.profile import Profile


@dataclass(frozen=True, eq=False)
class Options:
    """The non-dominated (policy, grid level) options of one (super-)layer, budget increasing, cost decreasing."""

    policy: np.ndarray  # (n,) index into Problem.policies
    level: np.ndarray  # (n,) index into Prepared.levels
    budget: np.ndarray  # (n,) tokens per member layer
    cost: np.ndarray  # (n,) summed over the members of the group


@dataclass(frozen=True, eq=False)
class Prepared:
    """Problem data after preprocessing: the kept grid, monotone curves, tied groups and their options."""

    levels: np.ndarray  # (K,) kept grid levels in [floor, cap], increasing; a budget lies in [levels[0], levels[-1]]
    unit: int  # gcd of levels - levels[0]: every grid level is a whole number of units above the lowest
    curves: np.ndarray  # (L_c, P, K) running minimum over the kept levels; +inf where a policy is not allowed
    groups: tuple[np.ndarray, ...]  # member positions (into Problem.layers) of each group; singletons if untied
    mult: np.ndarray  # (J,) members per group: a group's budget counts this many times in the total
    group_curves: np.ndarray  # (J, P, K) summed member curves
    options: tuple[Options, ...]  # (J,) non-dominated options of each group

    @property
    def lo(self) -> int:
        return int(self.levels[0])

    @property
    def hi(self) -> int:
        return int(self.levels[-1])

    @property
    def span(self) -> int:
        return self.hi - self.lo

    def pointwise(self, rows: np.ndarray, budgets: np.ndarray) -> np.ndarray:
        """Row i of `rows` (n, K) read at budgets[i] (n,): (n,)."""
        seg, frac = self._segments(budgets)
        n, nxt = np.arange(len(rows)), np.minimum(seg + 1, len(self.levels) - 1)
        finite = np.isfinite(rows).all(axis=1)
        safe = np.where(np.isfinite(rows), rows, 0.0)
        return np.where(finite, (1.0 - frac) * safe[n, seg] + frac * safe[n, nxt], np.inf)

    def _segments(self, budgets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Left level index and position in [0, 1] of each budget between its two levels."""
        budgets = np.asarray(budgets, dtype=np.int64)
        if len(self.levels) == 1:
            return np.zeros(len(budgets), dtype=np.int64), np.zeros(len(budgets))
        seg = np.clip(np.searchsorted(self.levels, budgets, side="right") - 1, 0, len(self.levels) - 2)  # (n,)
        left, right = self.levels[seg], self.levels[seg + 1]
        return seg, (budgets - left) / (right - left)  # frac exactly 0 or 1 on a level

    def interpolate(self, curves: np.ndarray, budgets: np.ndarray) -> np.ndarray:
        """Curves (..., K) at integer budgets (n,) by linear interpolation between levels: (..., n)."""
        seg, frac = self._segments(budgets)  # (n,), (n,)
        finite = np.isfinite(curves)
        safe = np.where(finite, curves, 0.0)
        nxt = np.minimum(seg + 1, len(self.levels) - 1)
        out = (1.0 - frac) * safe[..., seg] + frac * safe[..., nxt]  # (..., n)
        return np.where(finite.all(axis=-1, keepdims=True), out, np.inf)


@dataclass(frozen=True, eq=False)
class Problem:
    """Choose a policy and a budget for every compressible layer; budgets sum to `total` exactly.

    costs (L_c, P, G): predicted loss of compressing only layer `layers[i]` with `policies[p]` to `budgets[g]`.
    Each curve is made non-increasing (running minimum over the kept grid) and read between grid levels by
    linear interpolation, so any integer budget in [lowest, highest kept level] has a cost and totals that are
    not a sum of grid levels are reached exactly. Grid levels outside [floor, cap] are dropped.
    """

    costs: np.ndarray
    budgets: Sequence[int]
    layers: Sequence[int]
    policies: Sequence[str]
    total: int
    floor: int = 1
    cap: int | None = None
    allowed: Mapping[str, Sequence[int]] | None = None  # policy -> the only layers where it may be used
    tied: Sequence[Sequence[int]] | None = None  # groups of layers forced to one policy and one budget
    max_policies: int | None = None  # at most this many distinct policies over all layers

    def __post_init__(self) -> None:
        costs = np.asarray(self.costs, dtype=np.float64)
        put = object.__setattr__
        put(self, "costs", costs)
        put(self, "budgets", tuple(int(b) for b in self.budgets))
        put(self, "layers", tuple(int(i) for i in self.layers))
        put(self, "policies", tuple(str(p) for p in self.policies))
        put(self, "total", _as_int(self.total, "total"))
        put(self, "floor", _as_int(self.floor, "floor"))
        if self.cap is not None:
            put(self, "cap", _as_int(self.cap, "cap"))
        if self.allowed is not None:
            put(self, "allowed", {str(p): tuple(int(i) for i in ls) for p, ls in self.allowed.items()})
        if self.tied is not None:
            put(self, "tied", tuple(tuple(int(i) for i in group) for group in self.tied))
        self._check()

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_profile(cls, profile: Profile, *, average_budget: float, cost: str = "mass_lost",
                     weighting: str = "mean", policies: Sequence[str] | None = None, floor: int = 1,
                     cap: int | None = None,
                     allowed: Mapping[str, Sequence[int]] | None = None,
                     tied: Sequence[Sequence[int]] | None = None, max_policies: int | None = None) -> Problem:
        """The problem for a profile at `average_budget` tokens per compressible layer (total rounded half up);
        `weighting` says how the profile's samples combine (`Profile.layer_costs`)."""
        known = profile.policies
        names = list(known) if policies is None else list(dict.fromkeys(policies))
        unknown = [p for p in names if p not in known]
        if unknown or not names:
            raise ConfigError(f"policy {', '.join(map(repr, unknown)) or '(none)'} is not in the profile; "
                              f"known policies: {', '.join(known)}")
        try:
            average = float(average_budget)
        except (TypeError, ValueError):
            average = math.nan
        if not math.isfinite(average) or average <= 0:
            raise ConfigError(f"average budget {average_budget!r} is not a positive number of tokens per layer")
        layers = profile.model.compressible_layers
        if not layers:
            raise ConfigError(f"model {profile.model.model_id} has no compressible layer (all are sliding-window)")
        table = profile.layer_costs(cost, weighting, budget=average).double().numpy()  # (L, P_all, G)
        chosen = [known.index(p) for p in names]
        costs = table[np.ix_(layers, chosen, range(table.shape[2]))]  # (L_c, P, G)
        total = math.floor(average * len(layers) + 0.5)
        return cls(costs, profile.budgets, layers, names, total, floor=floor, cap=cap, allowed=allowed,
                   tied=tied, max_policies=max_policies)

    # -- checks ------------------------------------------------------------------------------------
    def _check(self) -> None:
        expected = (len(self.layers), len(self.policies), len(self.budgets))
        if self.costs.shape != expected:
            raise ConfigError(f"costs have shape {self.costs.shape}, expected (layers, policies, budgets) = "
                              f"{expected}")
        if 0 in expected:
            raise ConfigError("the problem needs at least one layer, one policy and one budget level")
        if len(set(self.policies)) != len(self.policies):
            raise ConfigError(f"policy names repeat: {', '.join(self.policies)}; give each policy once")
        if len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"layer ids repeat: {list(self.layers)}; give each compressible layer once")
        grid = np.asarray(self.budgets)
        if grid[0] < 1 or np.any(np.diff(grid) <= 0):
            raise ConfigError(f"budget grid {list(self.budgets)} must be positive and strictly increasing")
        if np.isnan(self.costs).any() or np.isinf(self.costs).any():
            i, p, g = np.argwhere(~np.isfinite(self.costs))[0]
            raise ConfigError(f"cost of layer {self.layers[i]}, policy {self.policies[p]!r}, budget "
                              f"{self.budgets[g]} is {self.costs[i, p, g]}; re-run calibrate (sliding-window "
                              f"layers must be left out of the problem)")
        if self.floor < 1:
            raise ConfigError(f"floor {self.floor} must be at least 1 token per layer")
        if self.cap is not None and self.cap < self.floor:
            raise ConfigError(f"cap {self.cap} is below floor {self.floor}; raise the cap or lower the floor")
        kept = [b for b in self.budgets if b >= self.floor and (self.cap is None or b <= self.cap)]
        if not kept:
            raise ConfigError(f"no budget level of the grid {list(self.budgets)} lies in [floor {self.floor}, "
                              f"cap {self.cap}]; widen the range or calibrate with a finer grid")
        layer_set = set(self.layers)
        for name, members in (self.allowed or {}).items():
            if name not in self.policies:
                raise ConfigError(f"allowed names policy {name!r}; known policies: {', '.join(self.policies)}")
            bad = sorted(set(members) - layer_set)
            if bad:
                raise ConfigError(f"allowed[{name!r}] names layers {bad} that are not compressible; "
                                  f"compressible layers: {list(self.layers)}")
        seen: set[int] = set()
        for group in self.tied or ():
            bad = sorted(set(group) - layer_set)
            if bad:
                raise ConfigError(f"tied group {list(group)} names layers {bad} that are not compressible; "
                                  f"compressible layers: {list(self.layers)}")
            if seen & set(group) or len(set(group)) != len(group):
                raise ConfigError(f"tied group {list(group)} repeats a layer; each layer may be in one group")
            seen |= set(group)
        if self.max_policies is not None and self.max_policies < 1:
            raise ConfigError(f"max_policies {self.max_policies} must be at least 1")
        self._check_total(kept)

    def _check_total(self, kept: list[int]) -> None:
        lo, hi, n = kept[0], kept[-1], len(self.layers)
        if not lo * n <= self.total <= hi * n:
            raise SolverError(f"total budget {self.total} ({self.total / n:g} tokens per layer over {n} layers) "
                              f"is infeasible: feasible averages are {lo} to {hi} tokens per layer (grid levels "
                              f"in [floor {self.floor}, cap {self.cap}]); choose an average in that range")
        step = reduce(math.gcd, self.group_sizes())
        if self.total % step:
            below, above = self.total - self.total % step, self.total - self.total % step + step
            raise SolverError(f"total budget {self.total} cannot be split exactly: tied groups make every total a "
                              f"multiple of {step}; use {below} or {above} (average {below / n:g} or {above / n:g})")

    def infeasible_message(self) -> str:
        """Why no plan may exist although the total is in range: the constraints that combine badly."""
        parts = []
        sizes = sorted(set(self.group_sizes()))
        if sizes != [1]:
            parts.append(f"budgets of tied groups of sizes {sizes} must add up to exactly {self.total}")
        if self.max_policies is not None:
            parts.append(f"{self.max_policies} policies must cover every layer's allowed policies")
        return (f"no plan meets every constraint at total {self.total} ({'; '.join(parts) or 'see allowed'}); "
                f"relax one of them or try a nearby average budget")

    def group_sizes(self) -> list[int]:
        """Size of every group of tied layers, 1 for each untied layer."""
        tied = [len(g) for g in self.tied or () if len(g) > 1]
        return tied + [1] * (len(self.layers) - sum(tied))

    # -- preprocessing -----------------------------------------------------------------------------
    @cached_property
    def prepared(self) -> Prepared:
        grid = np.asarray(self.budgets, dtype=np.int64)
        keep = (grid >= self.floor) & (grid <= (self.cap if self.cap is not None else grid[-1]))
        levels = grid[keep]  # (K,)
        unit = reduce(math.gcd, (int(v) for v in levels - levels[0]), 0) or 1
        curves = np.minimum.accumulate(self.costs[:, :, keep], axis=2)  # (L_c, P, K) non-increasing
        curves = np.where(self.allowed_mask()[:, :, None], curves, np.inf)
        position = {layer: i for i, layer in enumerate(self.layers)}
        tied = [sorted(position[i] for i in g) for g in self.tied or () if len(g) > 1]
        in_group = {i for g in tied for i in g}
        groups = sorted([np.asarray(g) for g in tied] + [np.asarray([i]) for i in range(len(self.layers))
                                                         if i not in in_group], key=lambda g: int(g[0]))
        group_curves = np.stack([curves[g].sum(axis=0) for g in groups])  # (J, P, K); inf if any member bars p
        blocked = [j for j, g in enumerate(groups) if not np.isfinite(group_curves[j, :, 0]).any()]
        if blocked:
            names = [[self.layers[i] for i in groups[j]] for j in blocked]
            raise ConfigError(f"layer(s) {names[0]} have no allowed policy (check `allowed` and `tied`); every "
                              f"layer needs at least one")
        options = frontier(group_curves, levels, np.ones(len(self.policies), dtype=bool))
        return Prepared(levels=levels, unit=unit, curves=curves, groups=tuple(groups),
                        mult=np.asarray([len(g) for g in groups]), group_curves=group_curves, options=options)

    def allowed_mask(self) -> np.ndarray:
        """(L_c, P) True where a policy may be used in a layer."""
        mask = np.ones((len(self.layers), len(self.policies)), dtype=bool)
        for name, members in (self.allowed or {}).items():
            p = self.policies.index(name)
            mask[:, p] = np.isin(np.asarray(self.layers), np.asarray(members, dtype=np.int64))
        return mask

    # -- evaluation --------------------------------------------------------------------------------
    def objective(self, policies: Sequence[str], budgets: Sequence[int]) -> float:
        """Predicted cost of a plan (one policy and budget per compressible layer, in `layers` order)."""
        prep = self.prepared
        p_idx = np.asarray([self.policies.index(p) for p in policies])
        b = np.asarray(budgets, dtype=np.int64)
        if len(b) != len(self.layers) or b.min() < prep.lo or b.max() > prep.hi:
            raise SolverError(f"budgets {list(b)} are outside [{prep.lo}, {prep.hi}] or not one per layer")
        return float(prep.pointwise(prep.curves[np.arange(len(b)), p_idx], b).sum())

    def violations(self, policies: Sequence[str], budgets: Sequence[int]) -> list[str]:
        """Every constraint a plan breaks (empty when feasible): exact total, range, allowed, tied, max policies."""
        prep, problems = self.prepared, []
        if len(policies) != len(self.layers) or len(budgets) != len(self.layers):
            return [f"plan has {len(policies)} policies and {len(budgets)} budgets for {len(self.layers)} layers"]
        if sum(int(b) for b in budgets) != self.total:
            problems.append(f"budgets sum to {sum(budgets)}, not {self.total}")
        for layer, b in zip(self.layers, budgets):
            if int(b) != b or not prep.lo <= b <= prep.hi:
                problems.append(f"layer {layer} budget {b} is outside [{prep.lo}, {prep.hi}] or not an integer")
        mask = self.allowed_mask()
        for i, (layer, p) in enumerate(zip(self.layers, policies)):
            if p not in self.policies or not mask[i, self.policies.index(p)]:
                problems.append(f"layer {layer} uses policy {p!r}, which is not allowed there")
        where = {layer: i for i, layer in enumerate(self.layers)}
        for group in self.tied or ():
            if len({(policies[where[i]], int(budgets[where[i]])) for i in group}) > 1:
                problems.append(f"tied layers {list(group)} differ in policy or budget")
        if self.max_policies is not None and len(set(policies)) > self.max_policies:
            problems.append(f"plan uses {len(set(policies))} policies, more than max_policies {self.max_policies}")
        return problems


def frontier(group_curves: np.ndarray, levels: np.ndarray, policy_mask: np.ndarray) -> tuple[Options, ...]:
    """Non-dominated grid options of each group (J, P, K) among the policies in `policy_mask` (P,).

    (p, b) is dominated when another option has budget <= b and cost <= its cost; of equal options the lower
    budget, then the lower policy index, is kept.
    """
    curves = np.where(policy_mask[None, :, None], group_curves, np.inf)  # (J, P, K)
    best = curves.min(axis=1)  # (J, K) best policy at each level
    arg = curves.argmin(axis=1)  # (J, K)
    before = np.concatenate([np.full((len(best), 1), np.inf), np.minimum.accumulate(best, axis=1)[:, :-1]], axis=1)
    keep = best < before  # (J, K) strictly better than every lower level
    out = []
    for j in range(len(best)):
        k = np.flatnonzero(keep[j])
        out.append(Options(policy=arg[j, k], level=k, budget=levels[k], cost=best[j, k]))
    return tuple(out)


def _as_int(value: object, name: str) -> int:
    if isinstance(value, bool) or not float(value).is_integer():  # type: ignore[arg-type]
        raise ConfigError(f"{name} {value!r} must be a whole number of tokens")
    return int(value)  # type: ignore[arg-type]
