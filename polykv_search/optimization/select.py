"""End-to-end selection: the profile proposes, a measurement on calibration samples decides.

The additive proxy (per-layer decoding attention lost) ranks whole plans poorly on small models (Spearman
0.13-0.25 on SmolLM2), so the exact solver is run under several proxies and budget floors, and each policy's
best budget split is solved too; these plans, every uniform plan, PyramidKV and CAKE are then measured end to
end on the calibration samples with the shared-prefill engine (one prefill per sample, one teacher-forced
forward per batch of candidates) and the best measured candidate wins. Every uniform plan is a candidate, so the
chosen plan is never worse than the best uniform policy on the calibration objective.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from polykv_search.calibration.profile import AROUND_KL, COST_KINDS, HEAD_COST_KINDS, Profile
from polykv_search.optimization.problem import Problem
from polykv_search.optimization.solve import solve
from polykv_search.optimization.allocators import cake_plan, pyramidkv_plan
from polykv_search.plan import Plan, uniform_plan

FLOOR_SHARES = (0.0, 0.25, 0.5)  # a layer keeps at least this share of the average budget (0: one token)


@dataclass
class Selection:
    name: str  # the winning candidate, e.g. "exact:out_err:floor0.25" or "uniform:streaming"
    plan: Plan
    value: float
    metric: str
    measured: dict[str, dict[str, float]] = field(default_factory=dict)  # candidate -> every metric

    def ranking(self) -> list[tuple[str, float]]:
        return sorted(((name, m[self.metric]) for name, m in self.measured.items()), key=lambda kv: kv[1])


def candidate_plans(profile: Profile, *, average: float, policies: Sequence[str] | None = None,
                    cap: int | None = None, costs: Sequence[str] | None = None,
                    floor_shares: Sequence[float] = FLOOR_SHARES, allocator_policy: str = "snapkv",
                    ) -> dict[str, Plan]:
    """Named candidate plans at `average` tokens per compressible layer, duplicates (same layers) removed."""
    info = profile.model
    names = list(policies or profile.policies)
    # every per-layer cost the profile holds (layer_kl with --layer-kl; head costs are per KV head, not a layer's)
    costs = list(costs or [kind for kind in profile.cost_kinds if kind not in HEAD_COST_KINDS])
    found: dict[str, Plan] = {}

    def add(name: str, candidate: Plan) -> None:
        if all(candidate.layers != plan.layers for plan in found.values()):
            found[name] = candidate

    for policy in names:  # first, so that a proposal equal to a uniform plan keeps the uniform name
        add(f"uniform:{policy}", uniform_plan(info, policy=policy, budget=average))
    allocator = allocator_policy if allocator_policy in names else names[0]
    for name, plan in (("pyramidkv", pyramidkv_plan(info, policy=allocator, budget=average)),
                       ("cake", cake_plan(info, profile, policy=allocator, budget=average))):
        add(name, plan)
    for cost in costs:
        if cost == AROUND_KL and average not in profile.around_budgets:
            continue  # its operating points are at other budgets
        for share in floor_shares:
            floor = max(1, math.floor(share * average))
            problem = Problem.from_profile(profile, average_budget=average, cost=cost, policies=names,
                                           floor=floor, cap=cap)
            add(f"exact:{cost}:floor{share:g}", solve(problem, solver="dp").to_plan(info, average_budget=average))
    split_cost = costs[0] if costs[0] != AROUND_KL or average in profile.around_budgets else COST_KINDS[0]
    for policy in names:  # one policy everywhere, the budget split chosen by the proxy
        problem = Problem.from_profile(profile, average_budget=average, cost=split_cost, policies=[policy], cap=cap,
                                       floor=max(1, math.floor(0.25 * average)))
        add(f"split:{policy}", solve(problem, solver="dp").to_plan(info, average_budget=average))
    return found


def select_plan(measure: Callable[[list[Plan]], list[dict[str, float]]], candidates: dict[str, Plan], *,
                metric: str) -> Selection:
    """Measure every candidate (lower is better) and keep the best; ties go to the earlier candidate."""
    names = list(candidates)
    results = measure([candidates[name] for name in names])
    measured = dict(zip(names, results))
    best = min(names, key=lambda name: measured[name][metric])  # min keeps the first of equal values
    return Selection(name=best, plan=candidates[best], value=measured[best][metric], metric=metric,
                     measured=measured)
