"""The policies as kvpress presses: build a policy's press, and turn its scores into a budget-independent ranking.

Keeping the top-b tokens of a ranking is what kvpress keeps at b, for every b (the table of names and parameters
is `catalog.py`, which needs neither torch nor kvpress). StreamingLLM's kvpress `score` marks tokens only for the
ratio it was built with, so it is ranked by kvpress's rule itself (sinks first, then by recency); the "+recent"
policies interleave that order with a scorer's order, skipping tokens already taken: the heavy-hitter + recent
split of the original H2O paper, made budget-independent so one ranking still serves every budget. A press that
draws a random sketch from torch's global RNG (Compactor's leverage) scores with it seeded per layer and restored
after, so every stage ranks alike; where kvpress's scores tie by construction (LagKV), the newest token goes first.
Tests check top-b equals kvpress at each b.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import kvpress
import torch
from kvpress import ScorerPress

from polykv_search.errors import ConfigError
from polykv_search.policies.catalog import N_SINK_RECENT, POLICIES, policy_params


def press_class(name: str) -> type[ScorerPress]:
    """The kvpress class of registered policy `name`."""
    return getattr(kvpress, POLICIES[name].press)


def make_press(name: str, *, compression_ratio: float = 0.0, **overrides: Any) -> ScorerPress:
    """Build the kvpress press for policy `name` (overrides replace registered parameters; ConfigError names an
    unknown or mistyped one). A wrapper (CriticalKV) wraps its registered scorer."""
    params = policy_params(name, **overrides)
    spec = POLICIES[name]
    if spec.inner is None:
        return press_class(name)(compression_ratio=compression_ratio, **params)
    if spec.ranking == "critical" and not 0 <= params["first_stage_ratio"] <= 1:  # else its stage grows faster
        raise ConfigError(f"policy {name!r}: first_stage_ratio {params['first_stage_ratio']} is outside [0, 1]; "
                          "give the share of the budget its first stage keeps")
    press = press_class(name)(getattr(kvpress, spec.inner)(**spec.inner_params), **params)
    press.compression_ratio = compression_ratio
    return press


def rank_scores(name: str, press: ScorerPress, module: torch.nn.Module, hidden_states: torch.Tensor,
                keys: torch.Tensor, values: torch.Tensor, attentions: torch.Tensor | None,
                kwargs: dict) -> torch.Tensor:
    """Scores (B, H_kv, T) whose top-b is what kvpress keeps at budget b, for every b."""
    spec = POLICIES[name]
    if spec.ranking == "sink_recency":
        n_sink = getattr(press, "n_sink", N_SINK_RECENT)
        order = sink_recency_order(keys.shape[2], n_sink, device=keys.device)  # (T,) place in the keep order
        return (keys.shape[2] - order).float().expand(*keys.shape[:2], -1)  # (B, H_kv, T), higher kept first
    if spec.ranking == "critical":  # CriticalKV's own score depends on the budget; its stages' scores do not
        first = press.press.score(module, hidden_states, keys, values, attentions, kwargs)  # (B, H_kv, T)
        second = (first + press.epsilon) * press.vwl1norm(values, module)  # (B, H_kv, T), as kvpress computes it
        return critical_order(first.float(), second.float(), press.first_stage_ratio)
    seeded = seeded_rng(spec.seed + module.layer_idx, keys.device) if spec.seed is not None else nullcontext()
    with seeded:
        scores = press.score(module, hidden_states, keys, values, attentions, kwargs).float()
    if spec.ranking == "with_recent":
        return interleave_with_recent(scores, N_SINK_RECENT)
    if spec.ranking == "score_ties_newest":
        return ties_newest_first(scores)
    return scores


@contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """torch's global RNG (and `device`'s, off the CPU) seeded for the block, and as it was after it."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def ties_newest_first(scores: torch.Tensor) -> torch.Tensor:
    """Scores (..., T) -> distinct scores in the same order, equal scores ordered newest token first; every top-b of
    the result is a top-b of `scores`."""
    n = scores.shape[-1]
    by_score = scores.flip(-1).argsort(dim=-1, descending=True, stable=True)  # (..., T) newest first among equals
    place = torch.empty_like(by_score).scatter_(-1, n - 1 - by_score,
                                                torch.arange(n, device=scores.device).expand_as(by_score))
    return (n - place).float()  # (..., T), higher kept first


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


def critical_order(first: torch.Tensor, second: torch.Tensor, first_stage_ratio: float) -> torch.Tensor:
    """CriticalKV's keep order as scores (B, H_kv, T): at budget b, kvpress keeps the m = max(1, int(b x ratio)) best
    tokens by `first`, then the best by `second` among the others up to b. m grows by at most one a step, so these
    sets are nested: step b adds the next token by `first` when m grows and it is not kept yet, else the next token
    by `second` not kept yet (ties: earlier token first). One pass over T per head (Python, O(T))."""
    *lead, n = first.shape
    by_first = first.argsort(dim=-1, descending=True, stable=True).reshape(-1, n).tolist()
    by_second = second.argsort(dim=-1, descending=True, stable=True).reshape(-1, n).tolist()
    grows = [False] * (n + 1)  # grows[b]: m(b) > m(b - 1)
    previous = 0
    for b in range(1, n + 1):
        m = max(1, int(b * first_stage_ratio)) if first_stage_ratio > 0 else 0
        grows[b], previous = m > previous, m
    places = []
    for order_a, order_b in zip(by_first, by_second):
        place = [0] * n
        taken = bytearray(n)
        a = c = 0
        for b in range(1, n + 1):
            if grows[b] and a < n:
                token, a = order_a[a], a + 1
                if not taken[token]:
                    taken[token], place[token] = 1, b
                    continue
            while taken[order_b[c]]:
                c += 1
            token = order_b[c]
            taken[token], place[token] = 1, b
        places.append(place)
    place = torch.tensor(places, device=first.device).reshape(*lead, n)  # (B, H_kv, T), 1 = kept first
    return (n + 1 - place).float()
