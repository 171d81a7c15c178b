"""Every problem of a plan file at once: JSON Schema violations with their path, then budget arithmetic,
layer layout, policy names and parameters, and (given a model) whether the plan was made for that model.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from jsonschema import Draft202012Validator

from polykv_search.errors import PlanError
from polykv_search.plan.rounding import budget_total
from polykv_search.plan.schema import PLAN_SCHEMA, SCHEMA_MAJOR
from polykv_search.policies.catalog import POLICIES, params_problems

if TYPE_CHECKING:
    from polykv_search.models.info import ModelInfo
    from polykv_search.plan.plan import PlanFile

SLIDING = "sliding_attention"
_VALIDATOR = Draft202012Validator(PLAN_SCHEMA)
_MAX_MESSAGE = 200  # a schema message quotes the bad value; keep each problem one readable line
_ONE_LINE = {ord(c): repr(c)[1:-1] for c in "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"}  # quoted text stays on one line
_RERUN = "the plan was made for another model; re-run `polykv-search optimize` with a profile of this model"


class InvalidPlanError(PlanError):
    """A plan with problems; `problems` holds each one, the message joins them on one line with a count."""

    def __init__(self, *, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = list(problems)
        count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
        super().__init__(f"plan file {source} has {count}: {'; '.join(problems)}")


def validate_plan_json(obj: Any, *, model: ModelInfo | None = None) -> list[str]:
    """All problems of a parsed plan file (an empty list when it is valid); never raises on any input."""
    if not isinstance(obj, dict):
        return [(f"$: a plan file is a JSON object with schema_version, producer, model and plans, "
                 f"not {_json_type(obj)}; give a plan written by polykv-search")]
    version = obj.get("schema_version")
    if isinstance(version, str) and re.fullmatch(r"\d+\.\d+\.\d+", version) and int(version.split(".")[0]) != SCHEMA_MAJOR:
        return [(f"$.schema_version: {version} is not readable by this polykv-search, which reads "
                 f"{SCHEMA_MAJOR}.x.y; upgrade polykv-search or write the plan with a matching version")]
    problems = [_schema_message(error) for error in sorted(_VALIDATOR.iter_errors(obj), key=_error_key)]
    problems += _non_finite_numbers(obj)
    problems += _semantic_problems(obj, model=model)
    return list(dict.fromkeys(p.translate(_ONE_LINE) for p in problems))


def check_matches_model(plan_file: PlanFile, model_info: ModelInfo) -> None:
    """Raise InvalidPlanError unless `plan_file` was made for `model_info` (identity, geometry, layer types)."""
    problems = validate_plan_json(plan_file.to_dict(), model=model_info)
    if problems:
        raise InvalidPlanError(source=f"for {plan_file.model.id}", problems=problems)


# -- schema messages ---------------------------------------------------------------------------------
def _error_key(error: Any) -> tuple:
    return tuple((0, p, "") if isinstance(p, int) else (1, 0, str(p)) for p in error.absolute_path)


def _schema_message(error: Any) -> str:
    message = " ".join(str(error.message).split())
    if len(message) > _MAX_MESSAGE:
        message = message[:_MAX_MESSAGE - 3] + "..."
    return f"{json_path(error.absolute_path)}: {message}"


def json_path(parts: Iterable[Any]) -> str:
    """'$.plans[0].layers[3].budget' from ['plans', 0, 'layers', 3, 'budget']."""
    out = "$"
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if re.fullmatch(r"[A-Za-z_]\w*", str(part))
                                                          else f"[{str(part)!r}]")
    return out


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "an array"}.get(
        type(value), type(value).__name__)


def _non_finite_numbers(obj: Any) -> list[str]:
    """NaN and infinities anywhere (a Python object may hold them; JSON text cannot)."""
    problems, stack = [], [((), obj)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{json_path(path)}: {value} is not a JSON number; give a finite number or null")
        elif isinstance(value, dict):
            stack.extend(((*path, key), item) for key, item in reversed(list(value.items())))
        elif isinstance(value, list):
            stack.extend(((*path, i), item) for i, item in reversed(list(enumerate(value))))
    return problems


# -- semantic checks (defensive: the object may also have schema violations) ----------------------
def _as_int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def _as_positive_number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value if value > 0 else None


def _semantic_problems(obj: dict[str, Any], *, model: ModelInfo | None) -> list[str]:
    block = obj.get("model") if isinstance(obj.get("model"), dict) else {}
    block_types = block.get("layer_types")
    block_types = block_types if isinstance(block_types, list) and all(isinstance(t, str) for t in block_types) \
        else None
    problems = []
    block_layers = _as_int(block.get("num_layers"))
    if block_types is not None and block_layers is not None and block_layers != len(block_types):
        problems.append(f"$.model.num_layers is {block_layers} but $.model.layer_types lists {len(block_types)} "
                        "layers; give one layer type per layer")
    if model is not None:
        problems += _model_mismatches(block, model)
        types, name = list(model.layer_types), model.model_id
    else:
        types, name = block_types, str(block.get("id", "the plan's model"))
    plans = obj.get("plans")
    if not isinstance(plans, list):
        return problems
    seen: dict[float, int] = {}
    for i, plan in enumerate(plans):
        if not isinstance(plan, dict):
            continue
        problems += _plan_problems(plan, where=f"$.plans[{i}]", types=types, model_name=name)
        average = _as_positive_number(plan.get("constraint", {}).get("average_budget")
                                      if isinstance(plan.get("constraint"), dict) else None)
        if average is not None:
            if average in seen:
                problems.append(f"$.plans[{i}].constraint.average_budget {average} repeats $.plans[{seen[average]}]; "
                                "a ladder holds one plan per average budget: drop one")
            seen.setdefault(average, i)
    return problems


def _model_mismatches(block: dict[str, Any], model: ModelInfo) -> list[str]:
    expected = {"id": model.model_id, "revision": model.revision, "num_layers": model.num_layers,
                "num_kv_heads": model.num_kv_heads, "head_dim": model.head_dim,
                "layer_types": list(model.layer_types)}
    problems = []
    for key, want in expected.items():
        got = block.get(key)
        if got != want:
            shown_got, shown_want = _short(got), _short(want)
            problems.append(f"$.model.{key} is {shown_got} but model {model.model_id} has {shown_want}: {_RERUN}")
    return problems


def _short(value: Any) -> str:
    if isinstance(value, list) and len(value) > 4:
        kinds = sorted(set(map(str, value)))
        return f"{len(value)} entries ({', '.join(f'{k!r} x{value.count(k)}' for k in kinds)})"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _plan_problems(plan: dict[str, Any], *, where: str, types: list[str] | None, model_name: str) -> list[str]:
    problems: list[str] = []
    layers = plan.get("layers")
    layers = layers if isinstance(layers, list) else []
    if types is not None and plan.get("layers") is not None and len(layers) != len(types):
        problems.append(f"{where}.layers has {len(layers)} layers but model {model_name} has {len(types)}; "
                        "give one entry per model layer")
    realised = 0
    realised_known = True
    for j, layer in enumerate(layers):
        if not isinstance(layer, dict):
            realised_known = False
            continue
        here = f"{where}.layers[{j}]"
        index = _as_int(layer.get("index"))
        if index is not None and index != j:
            problems.append(f"{here}.index is {index}, expected {j}; list the layers in order 0..L-1")
        sliding = layer.get("sliding_window") is True
        if types is not None and j < len(types) and sliding != (types[j] == SLIDING):
            if sliding:
                problems.append(f"{here} is marked sliding_window but model layer {j} is {types[j]}; give it a "
                                "policy and a budget (only the model's sliding_attention layers are fixed)")
            else:
                problems.append(f"{here} has a budget but model layer {j} is sliding_attention, fixed by the "
                                "architecture; mark it \"sliding_window\": true with \"budget\": null")
        if sliding:
            continue
        budget = _as_int(layer.get("budget"))
        if budget is None:
            realised_known = False
        else:
            realised += budget
        problems += _policy_problems(layer, where=here)
    problems += _constraint_problems(plan, where=where, types=types, layers=layers,
                                     realised=realised if realised_known else None)
    return problems


def _policy_problems(layer: dict[str, Any], *, where: str) -> list[str]:
    policy = layer.get("policy")
    if not isinstance(policy, str) or not policy:
        return []
    if policy not in POLICIES:
        return [f"{where}.policy {policy!r} is not a registered policy; known policies: {', '.join(POLICIES)}"]
    params = layer.get("params")
    if not isinstance(params, dict) or not all(isinstance(k, str) for k in params):
        return []
    scalars = {k: v for k, v in params.items() if v is None or isinstance(v, (str, int, float, bool))}
    if len(scalars) != len(params):
        return []  # the schema already reports the non-scalar values
    return params_problems(policy, params, where=f"{where}.params")


def _constraint_problems(plan: dict[str, Any], *, where: str, types: list[str] | None, layers: list[Any],
                         realised: int | None) -> list[str]:
    constraint = plan.get("constraint")
    if not isinstance(constraint, dict):
        return []
    here = f"{where}.constraint"
    average = _as_positive_number(constraint.get("average_budget"))
    total, total_realised = _as_int(constraint.get("total")), _as_int(constraint.get("total_realised"))
    problems = []
    if realised is not None and total_realised is not None and total_realised != realised:
        problems.append(f"{here}.total_realised is {total_realised} but the compressible layers' budgets sum to "
                        f"{realised}; set it to {realised} or fix the budgets")
    if types is not None:
        n = sum(1 for t in types if t != SLIDING)
    else:  # no usable model block: count the layers the plan itself does not mark sliding
        n = sum(1 for layer in layers if isinstance(layer, dict) and layer.get("sliding_window") is not True)
    if average is not None and total is not None:
        want = budget_total(average, n)
        if total != want:
            problems.append(f"{here}.total is {total} but average_budget {average} x {n} compressible layers "
                            f"= {want}; set total to {want}")
    if total is not None and total_realised is not None and total != total_realised:
        problems.append(f"{here}.total_realised {total_realised} differs from total {total}; "
                        f"the layer budgets must add up to exactly the total")
    return problems
