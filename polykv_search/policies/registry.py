"""The policy table: a name, the kvpress scorer it reuses, its parameters, and how to score it once.

Every policy must yield a ranking of the context tokens that does not depend on the budget, so one
prefill serves every budget: keeping the top-b tokens of the ranking is what kvpress keeps at b.
StreamingLLM's kvpress `score` marks tokens only for the ratio it was built with, so it is ranked
by kvpress's rule itself (sinks first, then by recency); tests check top-b equals kvpress at each b.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from kvpress import (
    ExpectedAttentionPress,
    KeyDiffPress,
    KnormPress,
    ObservedAttentionPress,
    RandomPress,
    ScorerPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
)

from polykv_search.errors import ConfigError


@dataclass(frozen=True)
class PolicySpec:
    """A kvpress scorer class with the parameters we use for it."""

    press: type[ScorerPress]
    params: dict[str, Any] = field(default_factory=dict)
    needs_attentions: bool = False  # the scorer reads the full (T x T) prefill attention
    ranking: str = "score"  # "score": kvpress score is a ranking; "sink_recency": StreamingLLM's rule
    description: str = ""


POLICIES: dict[str, PolicySpec] = {
    "snapkv": PolicySpec(SnapKVPress, {"window_size": 64, "kernel_size": 5},
                         description="attention of the last 64 context queries, pooled"),
    "streaming": PolicySpec(StreamingLLMPress, {"n_sink": 4}, ranking="sink_recency",
                            description="4 sink tokens plus the most recent tokens"),
    "tova": PolicySpec(TOVAPress, description="attention of the last context query"),
    "knorm": PolicySpec(KnormPress, description="smallest key norm first"),
    "expected_attention": PolicySpec(ExpectedAttentionPress, {"n_future_positions": 512, "n_sink": 4},
                                     description="attention expected from future query statistics"),
    "keydiff": PolicySpec(KeyDiffPress, description="keys least similar to the mean key"),
    "h2o": PolicySpec(ObservedAttentionPress, needs_attentions=True,
                      description="heavy hitters: mean attention received over all prefill queries"),
    "random": PolicySpec(RandomPress, {"seed": 0}, description="uniformly random (control)"),
}
DEFAULT_POLICIES: tuple[str, ...] = tuple(POLICIES)


def check_policy_names(names: Sequence[str]) -> list[str]:
    unknown = [n for n in names if n not in POLICIES]
    if unknown:
        raise ConfigError(f"unknown policy {', '.join(map(repr, unknown))}; known policies: {', '.join(POLICIES)}")
    if not names:
        raise ConfigError(f"no policy given; choose from: {', '.join(POLICIES)}")
    return list(dict.fromkeys(names))


def make_press(name: str, *, compression_ratio: float = 0.0, **overrides: Any) -> ScorerPress:
    """Build the kvpress press for policy `name` (overrides replace registered parameters)."""
    spec = POLICIES[name]
    params = {**spec.params, **overrides}
    valid = {f.name for f in dataclasses.fields(spec.press)}
    bad = sorted(set(params) - valid)
    if bad:
        raise ConfigError(f"policy {name!r} has no parameter {', '.join(bad)}; its parameters: {', '.join(sorted(valid))}")
    return spec.press(compression_ratio=compression_ratio, **params)


def rank_scores(name: str, press: ScorerPress, module: torch.nn.Module, hidden_states: torch.Tensor,
                keys: torch.Tensor, values: torch.Tensor, attentions: torch.Tensor | None,
                kwargs: dict) -> torch.Tensor:
    """Scores (B, H_kv, T) whose top-b is what kvpress keeps at budget b, for every b."""
    spec = POLICIES[name]
    if spec.ranking == "sink_recency":
        n_sink = getattr(press, "n_sink", 4)
        positions = torch.arange(keys.shape[2], device=keys.device, dtype=torch.float32)  # (T,)
        ranking = positions.clone()
        ranking[:n_sink] = keys.shape[2] + n_sink - positions[:n_sink]  # sinks above every recent token
        return ranking.expand(*keys.shape[:2], -1)  # (B, H_kv, T)
    scores = press.score(module, hidden_states, keys, values, attentions, kwargs)
    return scores.float()
