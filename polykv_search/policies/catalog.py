"""The policy table as plain data: each registered name, the kvpress press it reuses (by class name), that
press's parameters with their types and defaults, and how it ranks tokens. No torch, no kvpress: a plan file's
policies and parameters are checked from this table alone (`tests/policies/test_catalog.py` checks it against
kvpress's own dataclasses, so it cannot drift from them).

Every policy yields a ranking of the context tokens that does not depend on the budget, so one prefill serves
every budget. The "+recent" policies interleave StreamingLLM's order (4 sinks, then newest first) with a scorer's
order: keeping the top b gives the sinks, about b/2 of the newest tokens and about b/2 of the scorer's best.
kvpress presses that need downloaded weights or statistics (or an extra pass the shared prefill cannot host) are
named in `REFUSED`, each with the reason, so asking for one fails in one line before any model loads.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from polykv_search.errors import ConfigError

RATIO_FIELD = "compression_ratio"  # every kvpress scorer has it; set from each layer's budget, never stored
N_SINK_RECENT = 4  # sinks kept first by the "sink_recency" and "with_recent" rankings

# Each press's init parameters other than compression_ratio: name -> (accepted scalar types, kvpress default).
# A parameter typed with a Literal lists its accepted values (strings) instead of types.
PRESS_PARAMETERS: dict[str, dict[str, tuple[tuple[type, ...], Any]]] = {
    "SnapKVPress": {"window_size": ((int,), 64), "kernel_size": ((int,), 5)},
    "StreamingLLMPress": {"n_sink": ((int,), 4)},
    "TOVAPress": {},
    "KnormPress": {},
    "ExpectedAttentionPress": {"n_future_positions": ((int,), 512), "n_sink": ((int,), 4),
                               "use_covariance": ((bool,), True), "use_vnorm": ((bool,), True),
                               "epsilon": ((float,), 0.0)},
    "KeyDiffPress": {},
    "ObservedAttentionPress": {},
    "RandomPress": {"seed": ((int, type(None)), None)},
    "LagKVPress": {"n_sink": ((int,), 4), "lag_size": ((int,), 128), "cross_scoring": ((bool,), False)},
    "CURPress": {"num_sinks": ((int,), 4), "leverage_type": (("key", "value", "kv_avg", "kv_product"), "kv_product"),
                 "use_random_leverage": ((bool,), False), "use_local_approximation": ((bool,), True),
                 "local_window_size": ((int,), 16)},
    "LeverageScorePress": {"sketch_dimension": ((int,), 48)},
    "NonCausalAttnPress": {"chunk_size": ((int,), 256)},
    "CompactorPress": {"sink_size_start": ((int,), 8), "sink_size_end": ((int,), 4), "chunk_size": ((int,), 256),
                       "sketch_dimension": ((int,), 48), "blending": ((float, type(None)), None)},
    "CapPress": {"tau": ((float,), 5.0), "n_future_positions": ((int,), 512), "n_sink": ((int,), 4),
                 "epsilon": ((float,), 1e-6)},
    "CriticalKVPress": {"epsilon": ((float,), 1e-4), "first_stage_ratio": ((float,), 0.5)},  # and `press`: `inner`
}


@dataclass(frozen=True)
class PolicySpec:
    """A kvpress scorer (by class name) with the parameters we use for it."""

    press: str  # class name in kvpress
    params: dict[str, Any] = field(default_factory=dict)  # registered values, overriding kvpress's defaults
    needs_attentions: bool = False  # the scorer reads the prefill attention (H2O's column sums)
    ranking: str = "score"  # "score": kvpress score; "sink_recency": StreamingLLM's rule; "with_recent": interleaved;
    # "score_ties_newest": kvpress score, equal scores ranked newest token first (kvpress's top-k leaves them unordered);
    # "critical": CriticalKV's two stages as one keep order (its kvpress score depends on the budget)
    description: str = ""
    base: str | None = None  # "with_recent": the policy whose scores are interleaved (same press and parameters)
    seed: int | None = None  # the press draws from torch's global RNG: seeded to seed + layer index while it scores
    inner: str | None = None  # a wrapper press (CriticalKV): the kvpress scorer it wraps, built with `inner_params`
    inner_params: dict[str, Any] = field(default_factory=dict)  # every parameter of `inner`, fixed by the name


POLICIES: dict[str, PolicySpec] = {
    "snapkv": PolicySpec("SnapKVPress", {"window_size": 64, "kernel_size": 5},
                         description="attention of the last 64 context queries, pooled"),
    "streaming": PolicySpec("StreamingLLMPress", {"n_sink": 4}, ranking="sink_recency",
                            description="4 sink tokens plus the most recent tokens"),
    "tova": PolicySpec("TOVAPress", description="attention of the last context query"),
    "knorm": PolicySpec("KnormPress", description="smallest key norm first"),
    "expected_attention": PolicySpec("ExpectedAttentionPress", {"n_future_positions": 512, "n_sink": 4},
                                     description="attention expected from future query statistics"),
    "keydiff": PolicySpec("KeyDiffPress", description="keys least similar to the mean key"),
    "h2o": PolicySpec("ObservedAttentionPress", needs_attentions=True,
                      description="heavy hitters: mean attention received over all prefill queries"),
    "random": PolicySpec("RandomPress", {"seed": 0}, description="uniformly random (control)"),
    "h2o_recent": PolicySpec("ObservedAttentionPress", needs_attentions=True, ranking="with_recent", base="h2o",
                             description="4 sinks, then newest tokens and H2O's heavy hitters in turn"),
    "tova_recent": PolicySpec("TOVAPress", ranking="with_recent", base="tova",
                              description="4 sinks, then newest tokens and TOVA's choice in turn"),
    "keydiff_recent": PolicySpec("KeyDiffPress", ranking="with_recent", base="keydiff",
                                 description="4 sinks, then newest tokens and KeyDiff's choice in turn"),
    "expected_attention_recent": PolicySpec(
        "ExpectedAttentionPress", {"n_future_positions": 512, "n_sink": 4}, ranking="with_recent",
        base="expected_attention", description="4 sinks, then newest tokens and ExpectedAttention's choice in turn"),
    # Registered for #36, not among the defaults (calibrate's, evaluate's and the guard's): whether they help is a
    # later, measured step.
    "lagkv": PolicySpec("LagKVPress", {"n_sink": 4, "lag_size": 128}, ranking="score_ties_newest",
                        description="4 sinks and the last partition, then each 128-token partition's tokens by the "
                                    "spread of their keys and values scaled to the next partition's range (LagKV)"),
    "curdkv": PolicySpec("CURPress", {"num_sinks": 4}, seed=0,
                         description="4 sinks, then squared key norm x squared value norm, each normalized in "
                                     "16-token windows (CurDKV's approximate leverage)"),
    "leverage": PolicySpec("LeverageScorePress", {"sketch_dimension": 48}, seed=0,
                           description="statistical leverage of the pre-RoPE keys under a random sketch (Compactor's "
                                       "geometric score alone)"),
    "noncausal_attention": PolicySpec("NonCausalAttnPress", {"chunk_size": 256},
                                      description="attention from every query of the token's 256-token chunk, both "
                                                  "directions, x value norm (Compactor's attention score alone)"),
    # kvpress's default blending is the compression ratio, which would make the ranking depend on the budget; here it
    # is fixed, at the value kvpress itself falls back to (0.35).
    "compactor": PolicySpec("CompactorPress", {"blending": 0.35}, seed=0,
                            description="8 first and 4 last tokens, then non-causal attention + 0.35 x key leverage "
                                        "(Compactor)"),
    "capkv": PolicySpec("CapPress", description="4 sinks, then alignment with the mean past query x the value's "
                                                "leverage in the capacity matrix (CAPKV)"),
    # CriticalKV keeps half its budget by the scorer it wraps, the other half by that score x the L1 norm of the
    # value's output projection; kvpress computes the split from the budget, the ranking is the same keep order.
    "critical_snapkv": PolicySpec("CriticalKVPress", {"epsilon": 1e-4, "first_stage_ratio": 0.5}, ranking="critical",
                                  inner="SnapKVPress", inner_params={"window_size": 64, "kernel_size": 5},
                                  description="half the budget by SnapKV, half by SnapKV x |value W_o|_1 "
                                              "(CriticalKV)"),
    "critical_expected_attention": PolicySpec(
        "CriticalKVPress", {"epsilon": 1e-4, "first_stage_ratio": 0.5}, ranking="critical",
        inner="ExpectedAttentionPress", inner_params={"n_future_positions": 512, "n_sink": 4, "use_covariance": True,
                                                      "use_vnorm": False, "epsilon": 0.0},
        description="half the budget by ExpectedAttention (no value norm, as kvpress advises), half by it x "
                    "|value W_o|_1 (CriticalKV)"),
}
# The policies calibrate, evaluate and the guard use when none are named: those registered before #36.
DEFAULT_POLICIES: tuple[str, ...] = (
    "snapkv", "streaming", "tova", "knorm", "expected_attention", "keydiff", "h2o", "random", "h2o_recent",
    "tova_recent", "keydiff_recent", "expected_attention_recent")

# kvpress presses not registered, each with why: asking for one is refused in one line before any model loads.
REFUSED: dict[str, str] = {
    "qfilter": "QFilterPress loads Q-filters trained for each model from the Hugging Face hub (nthngdy/<model>_qfilt)",
    "kvzap": "KVzapPress loads a scoring model trained for each model from the Hugging Face hub",
    "fastkvzip": "FastKVzipPress loads gates trained for each model from the Hugging Face hub (Jang-Hyun/Fast-KVzip)",
    "expected_attention_stats": "ExpectedAttentionStatsPress loads query statistics from the Hugging Face hub, or "
                                "computes them on a downloaded data set (kmfoda/booksum); `expected_attention` "
                                "estimates them from the prompt itself",
    "dms": "DMS needs a model trained with its eviction heads (e.g. nvidia/Qwen3-8B-DMS-8x); kvpress's DMSPress "
           "without them evicts by a score threshold, not a budget",
    "kvzip": "KVzipPress scores tokens in extra forward passes after the prefill (the model asked to repeat the "
             "context through its tokenizer's chat template) and shares its budget over heads and layers itself; the "
             "shared prefill's per-layer scoring cannot host that pass, so it is not registered yet",
}
# The per-head recipe's first candidate set (`run`'s plan at every budget with the guard off): sinks and recency
# alone, and five scorers that each keep a head's newest tokens beside their choice (future queries, the prefill's attention, the last queries' attention
# with and without accumulation, key novelty). Chosen on SmolLM2's calibration samples by the cross-fitted task loss
# of the plans, against the first three alone (the figures: docs/results-per-head.md, "six candidate policies per head").
PER_HEAD_POLICIES: tuple[str, ...] = ("expected_attention_recent", "h2o_recent", "streaming", "tova_recent",
                                      "snapkv", "keydiff_recent")
# Five scorers alone, without a head's newest tokens. Per head their isolated costs are often lower, but a plan that
# leaves many heads a few tokens and none of the newest derails free-running answers: on SmolLM2's calibration
# samples, out of fold, plans with all eleven candidates measured better at 256-512 tokens per KV head and worse at
# 64-128 than plans with the six. So `run` calibrates all eleven and its guard chooses per budget between the plan
# of the six and the plan of the eleven (docs/results-per-head.md, "a candidate set per budget").
PER_HEAD_SCORERS: tuple[str, ...] = ("tova", "knorm", "expected_attention", "keydiff", "h2o")
PER_HEAD_POLICY_SETS: tuple[tuple[str, ...], ...] = (PER_HEAD_POLICIES, PER_HEAD_POLICIES + PER_HEAD_SCORERS)


def check_policy_names(names: Sequence[str]) -> list[str]:
    """The names, each once, in order; ConfigError naming the unknown ones and the known ones, or saying why a kvpress
    press polykv-search does not run is refused."""
    refused = [n for n in names if n in REFUSED]
    if refused:
        raise ConfigError(refusal(refused[0]))
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise ConfigError(f"unknown policy {', '.join(map(repr, unknown))}; known policies: {', '.join(POLICIES)}")
    if not names:
        raise ConfigError(f"no policy given; choose from: {', '.join(POLICIES)}")
    return list(dict.fromkeys(names))


def refusal(name: str) -> str:
    """One line: why refused policy `name` is not run, and what is."""
    return f"policy {name!r} is not available: {REFUSED[name]}; registered policies: {', '.join(POLICIES)}"


def policy_params(name: str, **overrides: Any) -> dict[str, Any]:
    """Every parameter of the policy's kvpress press with the registered values (and `overrides`), ratio excluded.

    Writing the full set, not only the registry's overrides, keeps a plan's meaning fixed if defaults change.
    """
    check_policy_names([name])
    spec = POLICIES[name]
    fields = PRESS_PARAMETERS[spec.press]
    problems = params_problems(name, overrides, where=f"policy {name!r}")
    if problems:
        raise ConfigError("; ".join(problems))
    return {key: overrides.get(key, spec.params.get(key, default)) for key, (_, default) in fields.items()}


def scorer_key(policy: str, params: Mapping[str, Any] | None = None) -> str:
    """A name for a policy with its parameters: the policy's name when they are the registered ones (or none are
    given), else the name followed by the parameters as sorted JSON. Equal keys rank tokens identically."""
    if not params or dict(params) == _registered(policy):
        return policy
    return f"{policy}{json.dumps(dict(params), sort_keys=True)}"


@cache
def _registered_items(policy: str) -> tuple[tuple[str, Any], ...]:
    return tuple(policy_params(policy).items())


def _registered(policy: str) -> dict[str, Any]:
    return dict(_registered_items(policy))


def params_problems(name: str, params: Mapping[str, Any], *, where: str) -> list[str]:
    """Problems with `params` for registered policy `name` (unknown keys, wrong types), one line each."""
    spec = POLICIES[name]
    fields = PRESS_PARAMETERS[spec.press]
    problems = []
    for key, value in params.items():
        if key == RATIO_FIELD:
            problems.append(f"{where}.{key}: {RATIO_FIELD} is set from the layer budget at run time; remove it")
        elif key not in fields:
            accepted = ", ".join(sorted(fields)) or "none"
            problems.append(f"{where}: {spec.press} (policy {name!r}) has no parameter {key!r}; "
                            f"its parameters: {accepted}")
        elif not _accepts(fields[key][0], value):
            kinds = _kind_name(fields[key][0])
            problems.append(f"{where}.{key}: {value!r} is not a valid {kinds} for {spec.press}; give a {kinds}"
                            if not kinds.startswith("one of") else
                            f"{where}.{key}: {value!r} is not accepted by {spec.press}; give {kinds}")
    return problems


def _accepts(kinds: tuple[Any, ...], value: Any) -> bool:
    if all(isinstance(k, str) for k in kinds):  # a Literal's values
        return isinstance(value, str) and value in kinds
    if isinstance(value, bool):
        return bool in kinds
    if isinstance(value, int):
        return int in kinds or float in kinds
    return any(isinstance(value, kind) for kind in kinds if kind is not bool)


def _kind_name(kinds: tuple[Any, ...]) -> str:
    if all(isinstance(k, str) for k in kinds):
        return "one of " + ", ".join(map(repr, kinds))
    return " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
