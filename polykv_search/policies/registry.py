"""The policy table: a name, the kvpress scorer it reuses, its parameters, and how to score it once.

Every policy must yield a ranking of the context tokens that does not depend on the budget, so one
prefill serves every budget: keeping the top-b tokens of the ranking is what kvpress keeps at b.
StreamingLLM's kvpress `score` marks tokens only for the ratio it was built with, so it is ranked
by kvpress's rule itself (sinks first, then by recency); tests check top-b equals kvpress at each b.

The "+recent" policies ("h2o_recent", ...) interleave StreamingLLM's order (4 sinks, then newest first) with a
kvpress scorer's order, skipping tokens already taken: keeping the top b gives the sinks, about b/2 of the newest
tokens and about b/2 of the scorer's best, at every b. This is the heavy-hitter + recent split of the original
H2O paper, made budget-independent so one ranking still serves every budget.
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
    ranking: str = "score"  # "score": kvpress score; "sink_recency": StreamingLLM's rule; "with_recent": interleaved
    description: str = ""
    base: str | None = None  # "with_recent": the policy whose scores are interleaved (same press and parameters)


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
    "h2o_recent": PolicySpec(ObservedAttentionPress, needs_attentions=True, ranking="with_recent", base="h2o",
                             description="4 sinks, then newest tokens and H2O's heavy hitters in turn"),
    "tova_recent": PolicySpec(TOVAPress, ranking="with_recent", base="tova",
                              description="4 sinks, then newest tokens and TOVA's choice in turn"),
    "keydiff_recent": PolicySpec(KeyDiffPress, ranking="with_recent", base="keydiff",
                                 description="4 sinks, then newest tokens and KeyDiff's choice in turn"),
    "expected_attention_recent": PolicySpec(
        ExpectedAttentionPress, {"n_future_positions": 512, "n_sink": 4}, ranking="with_recent",
        base="expected_attention", description="4 sinks, then newest tokens and ExpectedAttention's choice in turn"),
}
N_SINK_RECENT = 4  # sinks kept first by "sink_recency" and "with_recent" rankings
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
        n_sink = getattr(press, "n_sink", N_SINK_RECENT)
        order = sink_recency_order(keys.shape[2], n_sink, device=keys.device)  # (T,) place in the keep order
        return (keys.shape[2] - order).float().expand(*keys.shape[:2], -1)  # (B, H_kv, T), higher kept first
    scores = press.score(module, hidden_states, keys, values, attentions, kwargs).float()
    if spec.ranking == "with_recent":
        return interleave_with_recent(scores, N_SINK_RECENT)
    return scores


def sink_recency_order(n: int, n_sink: int, *, device: torch.device | str = "cpu") -> torch.Tensor:
    """Each token's place (0 = kept first) in StreamingLLM's order: the n_sink first tokens, then newest first."""
    positions = torch.arange(n, device=device)
    return torch.where(positions < n_sink, positions, n_sink + n - 1 - positions)


def interleave_with_recent(scores: torch.Tensor, n_sink: int) -> torch.Tensor:
    """Scores (..., T) -> scores whose order alternates StreamingLLM's order and `scores`' order (ties: earlier
    token first), each token placed at its first appearance. Places are distinct, so top-b is unambiguous."""
    n = scores.shape[-1]
    recency = sink_recency_order(n, n_sink, device=scores.device)  # (T,)
    by_score = scores.argsort(dim=-1, descending=True, stable=True)  # (..., T) token ids, best first
    place = torch.empty_like(by_score).scatter_(-1, by_score, torch.arange(n, device=scores.device).expand_as(by_score))
    first = torch.minimum(2 * recency, 2 * place + 1)  # (..., T) position in the interleaved sequence
    return (2 * n - first).float()
