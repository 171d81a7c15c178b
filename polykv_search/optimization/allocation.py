"""A solver's answer: a policy and an integer budget for every compressible layer (plan layer entries), with status,
bound and gap."""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from polykv_search.errors import SolverError
from polykv_search.models.info import ModelInfo
from polykv_search.optimization.problem import Prepared, Problem
from polykv_search.plan import LayerPlan, Plan, SearchInfo
from polykv_search.policies import POLICIES, policy_params

OPTIMAL = "optimal"  # proven optimal (the ILP: within its relative gap)
TIME_LIMIT = "time_limit"  # the best plan found before the time limit; `gap` says how far from proven


@dataclass(frozen=True)
class Allocation:
    """A solver's per-layer choices plus how they were found; `objective` is the problem's cost of `layers`."""

    layers: tuple[LayerPlan, ...]  # one per layer of the problem, in its order (a registered policy's full params)
    solver: str
    status: str  # OPTIMAL or TIME_LIMIT
    objective: float
    bound: float  # proven lower bound on the optimum
    gap: float  # (objective - bound) / |objective|, 0 when proven optimal exactly
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(int(layer.budget) for layer in self.layers)

    @property
    def policies(self) -> list[str]:
        return [layer.policy for layer in self.layers]

    @property
    def budgets(self) -> list[int]:
        return [int(layer.budget) for layer in self.layers]

    def to_plan(self, model: ModelInfo, *, average_budget: float, profile_signature: str | None = None,
                seed: int | None = None, notes: str | None = None) -> Plan:
        """The plan file entry of these choices at `average_budget`, with the solver's provenance."""
        search = SearchInfo(solver=self.solver, status=self.status, objective=float(self.objective),
                            bound=float(self.bound), gap=float(self.gap), profile_signature=profile_signature,
                            seed=seed, seconds=round(float(self.seconds), 4), notes=notes)
        return Plan.build(model, average_budget=average_budget, layers=self.layers, search=search)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def distribute(prep: Prepared, groups: Sequence[int], policy: np.ndarray, budget: np.ndarray, extra: int) -> None:
    """Raise the budgets of `groups` by `extra` units in place, steepest cost decrease first along each group's
    policy curve (ties: the smaller budget first), never above the highest level. A unit adds one token to
    every member of a group.

    For fixed policies and segments this is the exact fractional-knapsack rule; on an optimal plan with slack
    every slope is zero, so it only pads.
    """
    levels = [int(v) for v in prep.levels]
    heap: list[tuple[float, int, int, int]] = []

    def push(j: int) -> None:
        b = int(budget[j])
        if b < levels[-1]:
            k = bisect.bisect_right(levels, b) - 1  # segment levels[k] <= b < levels[k + 1]
            row = prep.group_curves[j, policy[j]]
            slope = (float(row[k + 1]) - float(row[k])) / (levels[k + 1] - levels[k])  # per token: linear piece
            heapq.heappush(heap, (slope, b, j, levels[k + 1]))

    for j in groups:
        push(j)
    while extra > 0:
        if not heap:
            raise SolverError(f"cannot place {extra} more tokens: every layer is at its highest budget {levels[-1]}")
        _, _, j, nxt = heapq.heappop(heap)
        step = min(extra, nxt - int(budget[j]))
        budget[j] += step
        extra -= step
        push(j)


def assemble(problem: Problem, policy: np.ndarray, budget: np.ndarray, *, solver: str, status: str,
             bound: float | None, seconds: float, info: dict[str, Any]) -> Allocation:
    """Expand per-group choices (J,) to per-layer ones, score them, and refuse any plan that breaks a constraint.

    bound None: the solver proved this plan optimal exactly (the bound is the objective, the gap 0).
    """
    prep = problem.prepared
    layer_policy = [""] * len(problem.layers)
    layer_budget = [0] * len(problem.layers)
    for j, members in enumerate(prep.groups):
        for i in members:
            layer_policy[i] = problem.policies[int(policy[j])]
            layer_budget[i] = int(budget[j])
    broken = problem.violations(layer_policy, layer_budget)
    if broken:
        raise SolverError(f"solver {solver} returned an invalid plan ({'; '.join(broken)}); this is a bug, "
                          f"please report it with the problem")
    objective = problem.objective(layer_policy, layer_budget)
    bound = objective if bound is None else min(bound, objective)  # a bound above a checked plan is tolerance
    gap = 0.0 if objective == bound else (objective - bound) / max(abs(objective), 1e-12)
    layers = tuple(LayerPlan(index=lay, policy=p, params=policy_params(p) if p in POLICIES else {}, budget=b)
                   for lay, p, b in zip(problem.layers, layer_policy, layer_budget))
    return Allocation(layers=layers, solver=solver, status=status, objective=objective, bound=bound, gap=gap,
                      seconds=seconds, info=info)
