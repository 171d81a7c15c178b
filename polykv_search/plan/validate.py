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
from polykv_search.plan.schema import PLAN_SCHEMA, READABLE_MAJORS, UNIT_PER_HEAD, UNIT_PER_LAYER
from polykv_search.policies.catalog import POLICIES, REFUSED, params_problems, refusal

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
    major = int(version.split(".")[0]) if isinstance(version, str) and re.fullmatch(r"\d+\.\d+\.\d+", version) \
        else None
    if major is not None and major not in READABLE_MAJORS:
        readable = " and ".join(f"{m}.x.y" for m in READABLE_MAJORS)
        return [(f"$.schema_version: {version} is not readable by this polykv-search, which reads {readable}; "
                 "upgrade polykv-search or write the plan with a matching version")]
    problems = [_schema_message(error) for error in sorted(_VALIDATOR.iter_errors(obj), key=_error_key)]
    problems += _non_finite_numbers(obj)
    problems += _semantic_problems(obj, model=model, major=major)
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


def _semantic_problems(obj: dict[str, Any], *, model: ModelInfo | None, major: int | None) -> list[str]:
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
        types, name, heads = list(model.layer_types), model.model_id, model.num_kv_heads
    else:
        types, name, heads = block_types, str(block.get("id", "the plan's model")), _as_int(block.get("num_kv_heads"))
    if obj.get("question_aware") is True and _version_below(obj.get("schema_version"), (2, 2)):
        problems.append("$.question_aware: a plan for the question-aware setting needs schema_version 2.2 or later; "
                        "write the file as 2.2.0")
    plans = obj.get("plans")
    if not isinstance(plans, list):
        return problems
    seen: dict[float, list[tuple[int, tuple[int, float] | None]]] = {}
    for i, plan in enumerate(plans):
        if not isinstance(plan, dict):
            continue
        problems += _plan_problems(plan, where=f"$.plans[{i}]", types=types, model_name=name, heads=heads,
                                   major=major)
        span, context_problems = _context_span(plan.get("context"), where=f"$.plans[{i}].context",
                                               version=obj.get("schema_version"))
        problems += context_problems
        average = _as_positive_number(plan.get("constraint", {}).get("average_budget")
                                      if isinstance(plan.get("constraint"), dict) else None)
        if average is not None:
            for j, other in seen.get(average, []):
                if span is None or other is None:
                    problems.append(f"$.plans[{i}].constraint.average_budget {average} repeats $.plans[{j}]; a "
                                    "ladder holds one plan per average budget (or one per range of prompt lengths, "
                                    "each with its `context`): drop one")
                elif span[0] <= other[1] and other[0] <= span[1]:
                    problems.append(f"$.plans[{i}].context overlaps $.plans[{j}].context at average budget "
                                    f"{average}; the rungs of one budget serve disjoint prompt lengths")
            seen.setdefault(average, []).append((i, span))
    return problems


def _version_below(version: Any, least: tuple[int, int]) -> bool:
    """Whether `version` ("M.m.p") is older than `least` (major, minor); False when it is not such a string (the
    schema says what is wrong with it)."""
    parts = str(version).split(".")
    return len(parts) == 3 and all(p.isdigit() for p in parts) and (int(parts[0]), int(parts[1])) < least


def _context_span(context: Any, *, where: str, version: Any) -> tuple[tuple[int, float] | None, list[str]]:
    """((min, max) prompt lengths of a rung's `context`, inf for no maximum; None without one), its problems."""
    if context is None:
        return None, []
    if not isinstance(context, dict):
        return None, []  # the schema says what is wrong
    if _version_below(version, (2, 1)):
        return None, [f"{where}: a rung's prompt lengths need schema_version 2.1 or later; write the file as 2.1.0"]
    low, high = _as_int(context.get("min_tokens")), context.get("max_tokens")
    high = float("inf") if high is None else _as_int(high)
    if low is None or high is None:
        return None, []
    problems = []
    if high < low:
        problems.append(f"{where}: max_tokens {high} is below min_tokens {low}; give min_tokens <= max_tokens")
    made = context.get("calibrated")
    if isinstance(made, list) and len(made) == 2 and all(isinstance(x, int) for x in made) and made[1] < made[0]:
        problems.append(f"{where}.calibrated: {made[0]} > {made[1]}; give [shortest, longest]")
    return (low, high), problems


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


def budgets_beyond_context(obj: Any, model: ModelInfo) -> list[str]:
    """Budgets of a plan file larger than the model's context window (a typo such as 1e12): a layer keeps at most
    its whole context, so such a budget is never spent. The runtime accepts them (the layer keeps everything);
    `validate --model` refuses them."""
    plans = obj.get("plans") if isinstance(obj, dict) else None
    if not model.max_context or not isinstance(plans, list):
        return []
    problems: list[str] = []
    for i, plan in enumerate(plans):
        layers = plan.get("layers") if isinstance(plan, dict) else None
        for j, layer in enumerate(layers if isinstance(layers, list) else []):
            if not isinstance(layer, dict):
                continue
            entries = layer.get("heads") if isinstance(layer.get("heads"), list) else []
            budgets = [(f"$.plans[{i}].layers[{j}].budget", layer.get("budget"))]
            budgets += [(f"$.plans[{i}].layers[{j}].heads[{h}].budget", head.get("budget"))
                        for h, head in enumerate(entries) if isinstance(head, dict)]
            for where, budget in budgets:
                if isinstance(budget, (int, float)) and not isinstance(budget, bool) and budget > model.max_context:
                    problems.append(f"{where} is {_fmt_number(budget)} tokens, more than model {model.model_id}'s "
                                    f"context of {model.max_context}; give at most {model.max_context}")
    return problems


def _fmt_number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


def _short(value: Any) -> str:
    if isinstance(value, list) and len(value) > 4:
        kinds = sorted(set(map(str, value)))
        return f"{len(value)} entries ({', '.join(f'{k!r} x{value.count(k)}' for k in kinds)})"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _plan_problems(plan: dict[str, Any], *, where: str, types: list[str] | None, model_name: str,
                   heads: int | None, major: int | None) -> list[str]:
    problems: list[str] = []
    layers = plan.get("layers")
    layers = layers if isinstance(layers, list) else []
    if types is not None and plan.get("layers") is not None and len(layers) != len(types):
        problems.append(f"{where}.layers has {len(layers)} layers but model {model_name} has {len(types)}; "
                        "give one entry per model layer")
    constraint = plan.get("constraint") if isinstance(plan.get("constraint"), dict) else {}
    unit = constraint.get("unit")
    per_head = unit == UNIT_PER_HEAD
    if per_head and major == 1:
        problems.append(f"{where}.constraint.unit {UNIT_PER_HEAD!r} needs schema_version 2.x; a 1.x plan counts "
                        f"{UNIT_PER_LAYER!r}")
    realised: int | None = 0
    for j, layer in enumerate(layers):
        if not isinstance(layer, dict):
            realised = None
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
        entries = layer.get("heads")
        if entries is not None:
            kept = _head_problems(entries, here=here, heads=heads, per_head=per_head, major=major,
                                  problems=problems)
        else:
            problems += _policy_problems(layer, where=here)
            budget = _as_int(layer.get("budget"))
            kept = None if budget is None else budget * (heads if per_head and heads else 1)
            if per_head and not heads:
                kept = None
        realised = None if realised is None or kept is None else realised + kept
    problems += _constraint_problems(plan, where=where, types=types, layers=layers, realised=realised,
                                     heads=heads if per_head else 1)
    return problems


def _head_problems(entries: Any, *, here: str, heads: int | None, per_head: bool, major: int | None,
                   problems: list[str]) -> int | None:
    """Problems of a layer's per-head entries (appended to `problems`); returns the tokens they keep, if known."""
    if major == 1:
        problems.append(f"{here}.heads: per-head entries need schema_version 2.x; write the file as 2.0.0")
    if not per_head:
        problems.append(f"{here}.heads: per-head budgets are counted in {UNIT_PER_HEAD!r}; set the plan's "
                        f"constraint.unit to {UNIT_PER_HEAD!r} and its totals in KV entries")
    if not isinstance(entries, list):
        return None
    if heads is not None and len(entries) != heads:
        problems.append(f"{here}.heads lists {len(entries)} KV heads but the model has {heads}; give one entry "
                        "per KV head")
    kept = 0
    for h, entry in enumerate(entries):
        if not isinstance(entry, dict):
            return None
        problems += _policy_problems(entry, where=f"{here}.heads[{h}]")
        budget = _as_int(entry.get("budget"))
        if budget is None:
            return None
        kept += budget
    return kept


def _policy_problems(layer: dict[str, Any], *, where: str) -> list[str]:
    policy = layer.get("policy")
    if not isinstance(policy, str) or not policy:
        return []
    if policy in REFUSED:
        return [f"{where}.{refusal(policy)}"]
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
                         realised: int | None, heads: int | None) -> list[str]:
    """The totals: `heads` KV heads per layer when budgets are counted per KV head (1: per layer)."""
    constraint = plan.get("constraint")
    if not isinstance(constraint, dict):
        return []
    here = f"{where}.constraint"
    average = _as_positive_number(constraint.get("average_budget"))
    total, total_realised = _as_int(constraint.get("total")), _as_int(constraint.get("total_realised"))
    problems = []
    what = "the compressible layers' budgets" if heads == 1 else "the KV heads' budgets"
    if realised is not None and total_realised is not None and total_realised != realised:
        problems.append(f"{here}.total_realised is {total_realised} but {what} sum to {realised}; set it to "
                        f"{realised} or fix the budgets")
    if types is not None:
        n = sum(1 for t in types if t != SLIDING)
    else:  # no usable model block: count the layers the plan itself does not mark sliding
        n = sum(1 for layer in layers if isinstance(layer, dict) and layer.get("sliding_window") is not True)
    if average is not None and total is not None and heads is not None:
        want = budget_total(average, n * heads)
        counted = f"{n} compressible layers" if heads == 1 else f"{n} compressible layers x {heads} KV heads"
        if total != want:
            problems.append(f"{here}.total is {total} but average_budget {average} x {counted} = {want}; set total "
                            f"to {want}")
    if total is not None and total_realised is not None and total != total_realised:
        problems.append(f"{here}.total_realised {total_realised} differs from total {total}; "
                        f"the budgets must add up to exactly the total")
    return problems
