"""Score a layer's context tokens for one policy from a prefill forward hook, without a (T x T) attention map.

Shared by calibrate, the evaluation engine and the plan presses, so every stage ranks tokens identically.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from kvpress import ScorerPress

from polykv_search.models.anatomy import logit_softcap
from polykv_search.policies.attention import attention_probs, attention_with_logsumexp
from polykv_search.policies.projections import reused_query_projection
from polykv_search.policies.presses import (
    N_SINK_RECENT,
    POLICIES,
    interleave_with_recent,
    rank_scores,
)

# Logits per head in one query chunk (512 KB). Measured on one CPU thread, SmolLM2 geometry at 2.8k tokens: 46-row
# chunks took 73 ms a layer against 171 ms for 374-row chunks (the logits of a small chunk stay in cache).
CHUNK_ELEMENTS = 1 << 17
MIN_CHUNK, MAX_CHUNK = 16, 512


def query_chunks(n: int, *, chunk_elements: int = CHUNK_ELEMENTS, last: int = 0) -> list[tuple[int, int]]:
    """(start, stop) query chunks covering 0..n; the final chunk holds at least the last `last` queries."""
    size = max(MIN_CHUNK, min(MAX_CHUNK, chunk_elements // max(n, 1)))
    tail_start = max(0, n - max(size, last))
    bounds = [(start, min(start + size, tail_start)) for start in range(0, tail_start, size)]
    return [*bounds, (tail_start, n)]


def observed_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, scaling: float, *, last: int = 64,
                       chunk_elements: int = CHUNK_ELEMENTS) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """A layer's causal prefill attention computed in query chunks, observing it on the way: H2O's column sums.

    query (1, H, n, D) with RoPE applied, key/value (1, H_kv, K, D); the n queries are the last n positions.
    Returns the attention output as transformers' attention functions do, (1, n, H, D) in the query's dtype, and
    (column sums (1, H, 1, K), the final chunk's probabilities (H, c, K) with c >= last). Doing this inside the
    model's own attention replaces a second pass over the T x T logits (SDPA's, then ours) with one.
    """
    _, num_heads, n, head_dim = query.shape
    num_kv, k_len = key.shape[1], key.shape[2]
    group = num_heads // num_kv
    offset = k_len - n
    softcap = logit_softcap(module)
    if query.device.type == "cpu" and attention_mask is None and not softcap and n == k_len:
        return _observed_from_logsumexp(query, key, value, scaling, last=last, chunk_elements=chunk_elements)
    q = query[0].float() * scaling  # (H, n, D)
    k, v = key[0].float(), value[0].float()  # (H_kv, K, D)
    out = torch.empty(num_heads, n, head_dim, device=query.device)
    column_sums = torch.zeros(1, num_heads, 1, k_len, device=query.device)
    probs = None
    for start, stop in query_chunks(n, chunk_elements=chunk_elements, last=last):
        rows, visible = stop - start, offset + stop  # a query never sees keys after its own position
        logits = torch.bmm(q[:, start:stop].reshape(num_kv, group * rows, head_dim),
                           k[:, :visible].transpose(1, 2)).view(num_heads, rows, visible)
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        future = torch.ones(rows, rows, dtype=torch.bool, device=query.device).triu_(1)
        logits[..., offset + start:visible].masked_fill_(future, float("-inf"))
        if attention_mask is not None:  # (1, 1|H, n, K): bool keep-mask or additive
            mask = attention_mask[0, :, start:stop, :visible]
            logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask
        probs = torch.softmax(logits, dim=-1)  # (H, c, visible)
        column_sums[0, :, 0, :visible] += probs.sum(dim=1)
        out[:, start:stop] = torch.bmm(probs.view(num_kv, group * rows, visible), v[:, :visible]).view(
            num_heads, rows, head_dim)
    assert probs is not None
    last_probs = torch.nn.functional.pad(probs, (0, k_len - probs.shape[-1]))  # (H, c, K)
    return out.transpose(0, 1)[None].to(query.dtype), (column_sums, last_probs)


def _observed_from_logsumexp(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float, *,
                             last: int, chunk_elements: int) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """observed_attention for a plain causal prefill on CPU: the output and each query's log-sum-exp from SDPA's own
    CPU kernel (the output is then exactly what the model's SDPA prefill gives), and the probabilities the column
    sums need as exp(logit - logsumexp), in query chunks, without a softmax or a second matmul with the values."""
    _, num_heads, n, head_dim = query.shape
    num_kv = key.shape[1]
    group = num_heads // num_kv
    every = (1, num_heads, n, head_dim)  # the kernel wants one KV head per query head
    dense_k = key[:, :, None].expand(1, num_kv, group, n, head_dim).reshape(every)
    dense_v = value[:, :, None].expand(1, num_kv, group, n, head_dim).reshape(every)
    out, logsumexp = attention_with_logsumexp(query, dense_k, dense_v, causal=True,
                                              scale=scaling)  # (1, H, n, D), (1, H, n) float32
    q = query[0].float() * scaling  # (H, n, D)
    k = key[0].float()  # (H_kv, n, D)
    column_sums = torch.zeros(1, num_heads, 1, n, device=query.device)
    probs = None
    for start, stop in query_chunks(n, chunk_elements=chunk_elements, last=last):
        rows = stop - start  # a query never sees keys after its own position
        probs = torch.bmm(q[:, start:stop].reshape(num_kv, group * rows, head_dim),
                          k[:, :stop].transpose(1, 2)).view(num_heads, rows, stop)
        probs.sub_(logsumexp[0, :, start:stop, None]).exp_()  # (H, c, stop): the softmax, normalized
        probs[..., start:stop].masked_fill_(torch.ones(rows, rows, dtype=torch.bool, device=query.device).triu_(1),
                                            0.0)
        column_sums[0, :, 0, :stop] += probs.sum(dim=1)
    assert probs is not None
    last_probs = torch.nn.functional.pad(probs, (0, n - probs.shape[-1]))  # (H, c, n)
    return out.transpose(1, 2).to(query.dtype), (column_sums, last_probs)


def policy_scores(name: str, press: ScorerPress, module: torch.nn.Module, hidden: torch.Tensor, keys: torch.Tensor,
                  values: torch.Tensor, kwargs: dict, *, min_chunk: int = 64,
                  chunk_elements: int = CHUNK_ELEMENTS,
                  observed: tuple[torch.Tensor, torch.Tensor] | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, H_kv, T) scores whose top-b is what kvpress keeps at b; plus the last query chunk's attention
    (H, c, T) when the policy needed the prefill attention (H2O), else None; that chunk holds at least the
    last `min_chunk` queries.

    H2O's kvpress score is a per-key sum over queries, so the column sums of query chunks are accumulated and
    handed to kvpress's own `score` as one summed query row. `observed` is what `observed_attention` left
    during this prefill; with it nothing is recomputed.
    """
    if not POLICIES[name].needs_attentions:
        return rank_scores(name, press, module, hidden, keys, values, None, kwargs), None
    if observed is not None:
        column_sums, last = observed
        return rank_scores(name, press, module, hidden, keys, values, column_sums, kwargs), last
    cos, sin = kwargs["position_embeddings"]
    n = keys.shape[2]
    column_sums = torch.zeros(keys.shape[0], module.config.num_attention_heads, 1, n, device=keys.device)
    probs = None
    for start, stop in query_chunks(n, chunk_elements=chunk_elements, last=min_chunk):
        probs = attention_probs(module, hidden[:, start:stop], keys, (cos[:, start:stop], sin[:, start:stop]),
                                first_position=start)  # (H, c, stop): later keys are masked anyway
        column_sums[0, :, 0, :stop] += probs.sum(dim=1)
    scores = rank_scores(name, press, module, hidden, keys, values, column_sums, kwargs)  # (1, H_kv, T)
    last = torch.nn.functional.pad(probs, (0, n - probs.shape[-1]))  # (H, c, T)
    return scores, last


def score_policies(presses: Mapping[str, ScorerPress], module: torch.nn.Module, hidden: torch.Tensor,
                   keys: torch.Tensor, values: torch.Tensor, kwargs: dict, *, names: Mapping[str, str] | None = None,
                   observed: tuple[torch.Tensor, torch.Tensor] | None = None, min_chunk: int = 64,
                   chunk_elements: int = CHUNK_ELEMENTS) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Every press's (B, H_kv, T) scores for one layer's prefill, keyed as `presses`, plus the last query chunk's
    attention (H, c, T) when a policy needed the prefill attention (else None).

    `names` maps a key to its registered policy when the key is a variant with other parameters (default: the key
    is the policy). A "+recent" policy with registered parameters whose base policy is also asked for reuses the
    base's scores instead of scoring again.
    """
    names = names or {}

    def derivable(key: str) -> bool:
        base = POLICIES[key].base if key in POLICIES and key not in names else None
        return base is not None and base in presses and base not in names

    scores: dict[str, torch.Tensor] = {}
    last = None
    with reused_query_projection(module, hidden):  # the model's own q_proj(hidden), when it was kept
        for key in sorted(presses, key=derivable):  # bases first
            if derivable(key):
                scores[key] = interleave_with_recent(scores[POLICIES[key].base], N_SINK_RECENT)
                continue
            scores[key], chunk = policy_scores(names.get(key, key), presses[key], module, hidden, keys, values,
                                               kwargs, min_chunk=min_chunk, chunk_elements=chunk_elements,
                                               observed=observed)
            last = chunk if chunk is not None else last
    return scores, last
