"""The plan file: a KV policy and token budget per layer (a ladder of budgets), its schema and its checks.

Needs neither torch nor kvpress, so another engine's tooling can read and validate plans with `jsonschema` alone:

    from polykv_search.plan import load_plan
    plan_file = load_plan("outputs/smollm2-135m/plan.json")   # InvalidPlanError lists every problem
"""

from polykv_search.plan.plan import (
    Constraint,
    ContextRange,
    HeadPlan,
    LayerPlan,
    Plan,
    PlanFile,
    PlanModel,
    Producer,
    SearchInfo,
    load_plan,
)
from polykv_search.plan.rounding import budget_total, exact_integer_budgets
from polykv_search.plan.schema import PLAN_SCHEMA, SCHEMA_VERSION
from polykv_search.plan.uniform import uniform_ladders, uniform_plan
from polykv_search.plan.validate import (
    InvalidPlanError,
    budgets_beyond_context,
    check_matches_model,
    validate_plan_json,
)

__all__ = [
    "PLAN_SCHEMA", "SCHEMA_VERSION", "Constraint", "ContextRange", "HeadPlan", "InvalidPlanError", "LayerPlan",
    "Plan", "PlanFile", "PlanModel", "Producer", "SearchInfo", "budget_total", "budgets_beyond_context", "check_matches_model",
    "exact_integer_budgets", "load_plan", "uniform_ladders", "uniform_plan", "validate_plan_json",
]
