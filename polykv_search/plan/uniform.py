"""The uniform plan: one policy and one budget on every compressible layer, the baseline every plan must beat; and
its ladders, one per policy, the single-policy candidates the guard and `choose` weigh a plan against."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from polykv_search.errors import ConfigError
from polykv_search.plan.plan import LayerPlan, Plan, PlanFile, PlanModel, SearchInfo
from polykv_search.plan.rounding import budget_total, exact_integer_budgets
from polykv_search.policies.catalog import check_policy_names, policy_params

if TYPE_CHECKING:
    from polykv_search.models.info import ModelInfo


def uniform_plan(model: ModelInfo | PlanModel, *, policy: str, budget: float,
                 params: dict[str, Any] | None = None) -> Plan:
    """The same policy and budget on every compressible layer (a fractional average spreads the remainder)."""
    started = time.perf_counter()
    n, total = checked_budget(model, policy=policy, budget=budget)
    budgets = exact_integer_budgets([1.0] * n, total)
    return plan_of_budgets(model, policy=policy, params=params, budget=budget, budgets=budgets,
                           search=SearchInfo(solver="uniform", status="heuristic", seconds=seconds_since(started)))


def uniform_ladders(model: ModelInfo | PlanModel, policies: Sequence[str], budgets: Sequence[float], *,
                    question_aware: bool = False) -> list[tuple[str, PlanFile]]:
    """(policy, a uniform plan of it at each budget) for each policy: the single-policy candidates, for prompts in
    the setting `question_aware` says."""
    return [(policy, PlanFile.build(model, [uniform_plan(model, policy=policy, budget=b) for b in budgets],
                                    question_aware=question_aware))
            for policy in policies]


def checked_budget(model: ModelInfo | PlanModel, *, policy: str, budget: float,
                   max_budget: int | None = None) -> tuple[int, int]:
    """(compressible layers, exact total) for an average `budget`; ConfigError for a bad policy or budget."""
    check_policy_names([policy])
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget) or budget < 1:
        raise ConfigError(f"--budget {budget!r} must be at least 1 token per layer")
    if max_budget is not None and max_budget < budget:
        raise ConfigError(f"--max-budget {max_budget} is below the average budget {budget}; raise it or lower "
                          "the budget")
    n = len(model.compressible_layers)
    return n, budget_total(budget, n)


def plan_of_budgets(model: ModelInfo | PlanModel, *, policy: str, params: dict[str, Any] | None, budget: float,
                    budgets: Sequence[int], search: SearchInfo) -> Plan:
    """One policy on every compressible layer with the given budgets (one per compressible layer, in order)."""
    layer_params = policy_params(policy, **(params or {}))
    layers = [LayerPlan(index=i, policy=policy, params=dict(layer_params), budget=int(b))
              for i, b in zip(model.compressible_layers, budgets)]
    return Plan.build(model, average_budget=budget, layers=layers, search=search)


def seconds_since(started: float) -> float:
    return round(time.perf_counter() - started, 6)
