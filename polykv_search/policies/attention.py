"""Recompute a layer's attention probabilities for chosen queries from its cache, as the model computes them; and
SDPA's CPU attention with each query's log-sum-exp, which the probabilities can be recovered from."""

from __future__ import annotations

import torch
from kvpress.utils import get_prerope_query_states
from transformers.models.llama.modeling_llama import rotate_half

from polykv_search.models.anatomy import logit_softcap


def attention_probs(module: torch.nn.Module, hidden_states: torch.Tensor, keys: torch.Tensor,
                    position_embeddings: tuple[torch.Tensor, torch.Tensor], *, first_position: int,
                    pad_to: int | None = None) -> torch.Tensor:
    """Softmax attention (H, n, K) of the n queries in `hidden_states` (1, n, d) over `keys` (1, H_kv, K, D).

    The queries sit at absolute positions first_position .. first_position + n - 1 and see keys up to their own
    position (causal); `position_embeddings` are the (cos, sin) of exactly those positions. Only the keys a query
    can see are multiplied; with `pad_to` the result is zero-padded to that many keys.
    """
    cos, sin = position_embeddings  # (1, n, D) each
    query = get_prerope_query_states(module, hidden_states)  # (1, H, n, D)
    query = query * cos.unsqueeze(1) + rotate_half(query) * sin.unsqueeze(1)  # (1, H, n, D), RoPE applied
    _, num_heads, n, head_dim = query.shape
    num_kv = keys.shape[1]
    visible = min(keys.shape[2], first_position + n)  # causal: no query sees past the last one's position
    key = keys[0, :, :visible].float()  # (H_kv, K', D)
    query = query[0].float() * module.scaling  # (H, n, D): scaling the n queries is cheaper than n x K' logits
    query = query.reshape(num_kv, (num_heads // num_kv) * n, head_dim)  # (H_kv, G*n, D), GQA groups
    logits = (query @ key.transpose(-1, -2)).reshape(num_heads, n, visible)  # (H, n, K')
    softcap = logit_softcap(module)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    if first_position + 1 < visible:  # mask keys after each query's own position (only the last n keys)
        q_pos = torch.arange(first_position, first_position + n, device=logits.device)[:, None]  # (n, 1)
        k_pos = torch.arange(first_position + 1, visible, device=logits.device)[None, :]  # (1, K' - p - 1)
        logits[..., first_position + 1:].masked_fill_(k_pos > q_pos, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (H, n, K'), one fused pass
    if pad_to is not None and pad_to > visible:
        probs = torch.nn.functional.pad(probs, (0, pad_to - visible))
    return probs  # (H, n, K)


def attention_with_logsumexp(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, causal: bool,
                             scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of query (B, h, q, D) over key/value (B, h, K, D) (as many heads: the caller lays out GQA): the
    output (B, h, q, D) and each query's log-sum-exp (B, h, q) of its scaled logits, float32 at least, so that
    softmax probabilities are exp(logit * scale - logsumexp) without a softmax. `causal` aligns top-left (for q = K,
    the prefill's mask). On a CPU, SDPA's own kernel there, called directly because the public function does not
    return the log-sum-exp (it exists for CPU tensors only); elsewhere the same from materialized logits."""
    if query.device.type == "cpu":
        out, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            query, key, value, 0.0, causal, scale=scale)[:2]
        return out, logsumexp
    return dense_attention_with_logsumexp(query, key, value, causal=causal, scale=scale)


def dense_attention_with_logsumexp(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, causal: bool,
                                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """`attention_with_logsumexp` from materialized logits, with public ops only: for any device."""
    wide = torch.promote_types(query.dtype, torch.float32)
    logits = torch.matmul(query.to(wide), key.to(wide).transpose(-1, -2)) * scale  # (B, h, q, K)
    if causal:
        future = torch.ones(logits.shape[-2:], dtype=torch.bool, device=logits.device).triu_(1)
        logits = logits.masked_fill(future, float("-inf"))
    logsumexp = torch.logsumexp(logits, dim=-1)
    out = torch.matmul((logits - logsumexp[..., None]).exp(), value.to(wide)).to(query.dtype)
    return out, logsumexp
