"""The plan file: a KV policy and token budget per layer (a ladder of budgets), its schema, checks and baselines."""

from polykv_search.plan.baselines import (
    cake_plan,
    cake_preferences,
    pyramidkv_plan,
    uniform_plan,
)
from polykv_search.plan.params import policy_params
from polykv_search.plan.plan import (
    Constraint,
    LayerPlan,
    Plan,
    PlanFile,
    PlanModel,
    Producer,
    SearchInfo,
)
from polykv_search.plan.rounding import budget_total, exact_integer_budgets
from polykv_search.plan.schema import PLAN_SCHEMA, SCHEMA_VERSION
from polykv_search.plan.validate import (
    InvalidPlanError,
    check_matches_model,
    validate_plan_json,
)

__all__ = [
    "PLAN_SCHEMA", "SCHEMA_VERSION", "Constraint", "InvalidPlanError", "LayerPlan", "Plan", "PlanFile", "PlanModel",
    "Producer", "SearchInfo", "budget_total", "cake_plan", "cake_preferences", "check_matches_model",
    "exact_integer_budgets", "policy_params", "pyramidkv_plan", "uniform_plan", "validate_plan_json",
]
