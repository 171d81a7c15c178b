"""Score a layer's context tokens for one policy from a prefill forward hook, without a (T x T) attention map.

Shared by calibrate, the evaluation engine and the plan presses, so every stage ranks tokens identically.
"""

from __future__ import annotations

import torch
from kvpress import ScorerPress

from polykv_search.policies.registry import POLICIES, rank_scores

CHUNK_ELEMENTS = 1 << 20  # logits per head in one query chunk (4 MB): bounds memory at long contexts


def policy_scores(name: str, press: ScorerPress, module: torch.nn.Module, hidden: torch.Tensor, keys: torch.Tensor,
                  values: torch.Tensor, kwargs: dict, *, min_chunk: int = 64,
                  chunk_elements: int = CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, H_kv, T) scores whose top-b is what kvpress keeps at b; plus the last query chunk's attention
    (H, c, T) when the policy needed the prefill attention (H2O), else None.

    H2O's kvpress score is a per-key sum over queries, so the column sums of query chunks are accumulated and
    handed to kvpress's own `score` as one summed query row.
    """
    if not POLICIES[name].needs_attentions:
        return rank_scores(name, press, module, hidden, keys, values, None, kwargs), None
    from polykv_search.calibrate.attention import attention_probs

    cos, sin = kwargs["position_embeddings"]
    n = keys.shape[2]
    chunk = max(min_chunk, min(512, chunk_elements // n))
    column_sums = torch.zeros(keys.shape[0], module.config.num_attention_heads, 1, n, device=keys.device)
    probs = None
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        probs = attention_probs(module, hidden[:, start:stop], keys, (cos[:, start:stop], sin[:, start:stop]),
                                first_position=start)  # (H, c, stop): later keys are masked anyway
        column_sums[0, :, 0, :stop] += probs.sum(dim=1)
    scores = rank_scores(name, press, module, hidden, keys, values, column_sums, kwargs)  # (1, H_kv, T)
    last = torch.nn.functional.pad(probs, (0, n - probs.shape[-1]))  # (H, c, T)
    return scores, last
