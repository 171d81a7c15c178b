"""What `evaluate` compares at each budget: the full cache, every uniform policy, PyramidKV and CAKE
allocations, and the user's plans, each turned into an engine Method (policy variant and budget per layer)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from polykv_search.calibrate.profile import Profile
from polykv_search.evaluate.engine import Method
from polykv_search.models import ModelInfo
from polykv_search.plan import (
    Plan,
    PlanFile,
    cake_plan,
    policy_params,
    pyramidkv_plan,
    uniform_plan,
)


@dataclass
class MethodSet:
    methods: list[Method] = field(default_factory=list)
    variants: dict[str, tuple[str, dict]] = field(default_factory=dict)  # engine key -> (policy, params)
    policies: set[str] = field(default_factory=set)  # registered policies with registered params

    def add_plan(self, name: str, family: str, plan: Plan) -> None:
        keys: list[str | None] = []
        for layer in plan.layers:
            if layer.policy is None or layer.budget is None:
                keys.append(None)
            elif dict(layer.params or {}) == policy_params(layer.policy):
                self.policies.add(layer.policy)
                keys.append(layer.policy)
            else:
                key = f"{layer.policy}{json.dumps(layer.params, sort_keys=True)}"
                self.variants[key] = (layer.policy, dict(layer.params))
                keys.append(key)
        budget = plan.average_budget
        budget = int(budget) if float(budget).is_integer() else budget
        self.methods.append(Method(name, family, budget, tuple(keys), tuple(plan.budgets)))


def build_methods(info: ModelInfo, *, budgets: Sequence[int], uniform_policies: Sequence[str],
                  allocators: Sequence[str], allocator_policy: str, profile: Profile | None,
                  plans: Sequence[tuple[str, PlanFile]]) -> MethodSet:
    """Every method to score: the given plans at their own budgets, the baselines at every budget."""
    out = MethodSet()
    for budget in budgets:
        for policy in uniform_policies:
            out.add_plan(policy, "uniform", uniform_plan(info, policy=policy, budget=budget))
        if "pyramidkv" in allocators:
            out.add_plan("pyramidkv", "allocator", pyramidkv_plan(info, policy=allocator_policy, budget=budget))
        if "cake" in allocators and profile is not None:
            out.add_plan("cake", "allocator", cake_plan(info, profile, policy=allocator_policy, budget=budget))
    for name, plan_file in plans:
        for plan in plan_file.plans:
            out.add_plan(name, "plan", plan)
    return out
