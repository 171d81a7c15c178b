"""What every exporter reads from a plan: one rung of the ladder, each KV head's entry, which entries keep their
whole context, and the one-line refusal that names the layers and heads an engine cannot express."""

from __future__ import annotations

from collections.abc import Sequence

from polykv_search.errors import ConfigError, ExportError, PlanError
from polykv_search.plan import HeadPlan, LayerPlan, Plan, PlanFile
from polykv_search.policies.catalog import policy_params

KVPRESS = "kvpress"  # any plan: our PlanPress reads the plan file itself
TRTLLM = "trtllm"  # TensorRT-LLM's KvCacheConfig: one StreamingLLM window per layer, one sink length
DUO_ATTENTION = "duo-attention"  # DuoAttention: each KV head full or StreamingLLM with one shared sink and window
TARGETS = (KVPRESS, TRTLLM, DUO_ATTENTION)
STREAMING = "streaming"
MAX_NAMED = 6  # layers named in a refusal before "and N more"


def check_target(to: str) -> str:
    if to not in TARGETS:
        raise ConfigError(f"--to {to!r} is not an export target; targets: {', '.join(TARGETS)}")
    return to


def check_tokens(value: int | None, flag: str) -> int | None:
    """None, or a whole number of tokens of at least 1 (ConfigError naming `flag` otherwise)."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigError(f"{flag} {value!r} must be a whole number of tokens of at least 1")
    return value


def pick_plan(plan_file: PlanFile, budget: float | None, context: int | None = None) -> Plan:
    """The rung at `budget` (and, where the file has one per range of prompt lengths, for prompts of `context`
    tokens: an engine's config serves one range); without a budget, the file's only one (a ladder must say which)."""
    if budget is None:
        if len(plan_file.budgets) > 1:
            budgets = ", ".join(f"{b:g}" for b in plan_file.budgets)
            raise PlanError(f"the plan file holds {len(plan_file.budgets)} budgets ({budgets}) and an engine takes "
                            "one; pick it with --budget")
        budget = plan_file.budgets[0]
    rungs = plan_file.rungs_for(budget)
    if len(rungs) > 1 and context is None:
        ranges = "; ".join(r.context.describe() if r.context else "every length" for r in rungs)
        raise PlanError(f"the plan has a rung per range of prompt lengths at budget {budget:g} ({ranges}) and an "
                        "engine's config takes one; pick it with --context (the prompt length it will serve)")
    return plan_file.plan_for(budget, context_tokens=context if len(rungs) > 1 else None)


def head_entries(layer: LayerPlan, num_kv_heads: int) -> list[HeadPlan]:
    """One entry per KV head of a compressible layer (a per-layer entry repeated)."""
    if layer.heads is not None:
        if len(layer.heads) != num_kv_heads:
            raise PlanError(f"layer {layer.index} has {len(layer.heads)} head entries but the model has "
                            f"{num_kv_heads} KV heads; give one entry per KV head")
        return list(layer.heads)
    return [HeadPlan(policy=layer.policy, params=dict(layer.params), budget=layer.budget)] * num_kv_heads


def keeps_all(entry: HeadPlan, context: int | None) -> bool:
    """Whether an entry keeps its whole context: no policy, or (with `context`) a budget of at least `context`."""
    if entry.policy is None or entry.budget is None:
        return True
    return context is not None and entry.budget >= context


def n_sink(entry: HeadPlan) -> int:
    """A StreamingLLM entry's sink tokens (its registered value when the plan leaves it out)."""
    return int(entry.params.get("n_sink", policy_params(STREAMING)["n_sink"]))


def where(slots: Sequence[tuple[int, int | None]]) -> str:
    """'layer 0 (heads 0, 1), layer 2' from (layer, head) pairs; head None: the whole layer."""
    layers: dict[int, list[int]] = {}
    for layer, head in slots:
        layers.setdefault(layer, [])
        if head is not None:
            layers[layer].append(head)
    parts = []
    for layer, heads in list(layers.items())[:MAX_NAMED]:
        if not heads:
            parts.append(f"layer {layer}")
        else:
            parts.append(f"layer {layer} (head{'s' if len(heads) > 1 else ''} {', '.join(map(str, heads))})")
    more = len(layers) - MAX_NAMED
    return ", ".join(parts) + (f" and {more} more layer{'s' if more > 1 else ''}" if more > 0 else "")


def refusal(plan: Plan, target: str, problems: dict[str, list[tuple[int, int | None]]], hint: str) -> ExportError:
    """One line: the rung, the target, each reason with the layers/heads it concerns, then how to fix it."""
    reasons = "; ".join(f"{where(slots)} {reason}" for reason, slots in problems.items() if slots)
    return ExportError(f"the plan at average budget {plan.average_budget:g} does not fit {target}: {reasons}; {hint}")
