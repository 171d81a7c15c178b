"""What `evaluate` compares at each budget: the full cache, every uniform policy, the PyramidKV and CAKE
allocations, and the user's plans, each a named plan."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from polykv_search.calibration.profile import Profile
from polykv_search.models.info import ModelInfo
from polykv_search.optimization.allocators import cake_plan, pyramidkv_plan
from polykv_search.plan import Plan, PlanFile, uniform_plan

FAMILIES = ("full", "uniform", "allocator", "plan")


@dataclass(frozen=True)
class Method:
    """A named plan in a comparison: `family` is full, uniform, allocator or plan (plan None: the full cache)."""

    name: str  # e.g. "full", "snapkv", "pyramidkv", "cake", or a plan file's stem
    family: str
    plan: Plan | None

    @property
    def average_budget(self) -> float | None:
        if self.plan is None:
            return None
        budget = self.plan.average_budget
        return int(budget) if float(budget).is_integer() else budget

    @property
    def key(self) -> str:
        """`name@budget`, or the name alone for the full cache."""
        return self.name if self.plan is None else f"{self.name}@{self.average_budget}"


FULL = Method("full", "full", None)


def build_methods(info: ModelInfo, *, budgets: Sequence[float], uniform_policies: Sequence[str],
                  allocators: Sequence[str], allocator_policy: str, profile: Profile | None,
                  plans: Sequence[tuple[str, PlanFile]]) -> list[Method]:
    """Every method to score (the full cache aside): the baselines at every budget, the given plans at their own."""
    out = []
    for budget in budgets:
        for policy in uniform_policies:
            out.append(Method(policy, "uniform", uniform_plan(info, policy=policy, budget=budget)))
        if "pyramidkv" in allocators:
            out.append(Method("pyramidkv", "allocator", pyramidkv_plan(info, policy=allocator_policy, budget=budget)))
        if "cake" in allocators and profile is not None:
            out.append(Method("cake", "allocator", cake_plan(info, profile, policy=allocator_policy, budget=budget)))
    for name, plan_file in plans:
        for plan in plan_file.plans:
            out.append(Method(name, "plan", plan))
    return out
