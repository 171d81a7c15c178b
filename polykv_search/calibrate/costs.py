"""Per-layer cost curves: what the decoding queries lose when a layer keeps only the top-b context tokens
of a policy's ranking. Every policy and every budget of the grid comes out of one sort and a few batched matmuls.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

EPS = 1e-12


def cost_curves(attn: torch.Tensor, values: torch.Tensor, rankings: torch.Tensor, budgets: Sequence[int],
                n_context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mass lost and relative output error per policy, KV head and budget, both (P, H_kv, G).

    attn:     (H, S, K) decoding queries' full-cache attention, K = n_context + suffix keys
    values:   (H_kv, K, D) value states of the same keys
    rankings: (P, H_kv, T) policy scores over the context, higher = kept first (T = n_context)
    Evicting context tokens renormalises attention over what is left; the suffix is never evicted.
    """
    num_heads, num_queries, _ = attn.shape
    num_kv, _, head_dim = values.shape
    num_policies = rankings.shape[0]
    group = num_heads // num_kv
    attn = attn.float()
    values = values.float().repeat_interleave(group, dim=0)  # (H, K, D)
    a_ctx, a_suf = attn[..., :n_context], attn[..., n_context:]  # (H, S, T), (H, S, S')
    o_full = attn @ values  # (H, S, D)
    o_norm = o_full.norm(dim=-1).clamp_min(EPS)  # (H, S)
    suf_num = a_suf @ values[:, n_context:]  # (H, S, D)
    suf_mass = a_suf.sum(dim=-1, keepdim=True)  # (H, S, 1)
    ctx_mass = a_ctx.sum(dim=-1)  # (H, S)

    top = min(max(int(b) for b in budgets), n_context)  # tokens ranked below the largest budget never count
    order = rankings.float().argsort(dim=-1, descending=True, stable=True)[..., :top]  # (P, H_kv, top)
    # Keys as rows, so whole rows are indexed: a query head shares the kept set of its KV head.
    cols = a_ctx.reshape(num_kv, group * num_queries, n_context).transpose(1, 2).contiguous()  # (H_kv, T, G*S)
    heads = torch.arange(num_kv)[None, :, None]  # (1, H_kv, 1)
    a_sorted = cols[heads, order]  # (P, H_kv, top, G*S): attention on the kept-first tokens, in keep order
    v_ctx = values[::group, :n_context]  # (H_kv, T, D): one copy per KV head
    v_sorted = v_ctx[heads, order]  # (P, H_kv, top, D)

    kept_num = torch.zeros(num_policies, num_kv, group * num_queries, head_dim)
    kept_mass = torch.zeros(num_policies, num_kv, group * num_queries)
    suf_num = suf_num.reshape(num_kv, group * num_queries, head_dim)  # (H_kv, G*S, D)
    suf_mass = suf_mass.reshape(num_kv, group * num_queries)
    o_full = o_full.reshape(num_kv, group * num_queries, head_dim)
    o_norm = o_norm.reshape(num_kv, group * num_queries)
    ctx_mass = ctx_mass.reshape(num_kv, group * num_queries)
    lost, err = [], []
    start = 0
    for budget in budgets:
        end = min(int(budget), n_context)
        if end > start:
            segment = a_sorted[:, :, start:end]  # (P, H_kv, n, G*S)
            kept_num += segment.transpose(-1, -2) @ v_sorted[:, :, start:end]  # (P, H_kv, G*S, D)
            kept_mass += segment.sum(dim=-2)
            start = end
        o_kept = (kept_num + suf_num) / (kept_mass + suf_mass).clamp_min(EPS)[..., None]  # (P, H_kv, G*S, D)
        err.append(((o_kept - o_full).norm(dim=-1) / o_norm).mean(dim=-1))  # (P, H_kv)
        lost.append((ctx_mass - kept_mass).clamp_min(0).mean(dim=-1))  # (P, H_kv)
    return torch.stack(lost, dim=-1), torch.stack(err, dim=-1)  # (P, H_kv, G) each
