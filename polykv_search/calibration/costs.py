"""Per-layer cost curves: what the decoding queries lose when a layer keeps only the top-b context tokens
of a policy's ranking. Every policy and every budget of the grid comes out of one sort and a few batched matmuls.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

EPS = 1e-12


def cost_curves(attn: torch.Tensor, values: torch.Tensor, rankings: torch.Tensor, budgets: Sequence[int],
                n_context: int, grads: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Mass lost and relative output error per policy, KV head and budget, both (P, H_kv, G); with `grads` also
    the draws' dot products of those gradients with the change of the attention output, (P, K, H_kv, G).

    attn:     (H, S, K) decoding queries' full-cache attention, K = n_context + suffix keys
    values:   (H_kv, K, D) value states of the same keys
    rankings: (P, H_kv, T) policy scores over the context, higher = kept first (T = n_context)
    grads:    (K, H, S, D) gradients of K answer draws' log-likelihood with respect to the attention output
              (head_fisher.answer_gradients); their dot products with the output's change give the Fisher estimate
    Evicting context tokens renormalises attention over what is left; the suffix is never evicted.
    """
    num_heads, num_queries, _ = attn.shape
    num_kv, _, head_dim = values.shape
    num_policies = rankings.shape[0]
    group = num_heads // num_kv
    columns = group * num_queries  # a query head shares the kept set of its KV head: its queries are columns
    attn, values = attn.float(), values.float()
    a_ctx, a_suf = attn[..., :n_context], attn[..., n_context:]  # (H, S, T), (H, S, S')
    per_head = values.repeat_interleave(group, dim=0)  # (H, K, D)
    o_full = (attn @ per_head).reshape(num_kv, columns, head_dim)
    o_norm = o_full.norm(dim=-1).clamp_min(EPS)  # (H_kv, G*S)
    suf_num = (a_suf @ per_head[:, n_context:]).reshape(num_kv, columns, head_dim)
    suf_mass = a_suf.sum(dim=-1).reshape(num_kv, columns)
    ctx_mass = a_ctx.sum(dim=-1).reshape(num_kv, columns)

    top = min(max(int(b) for b in budgets), n_context)  # tokens ranked below the largest budget never count
    order = rankings.float().argsort(dim=-1, descending=True, stable=True)[..., :top]  # (P, H_kv, top)
    rows = order + torch.arange(num_kv)[None, :, None] * n_context  # row of (KV head, token) in the flat tables
    # Keys as rows (index_select copies whole rows); each budget's segment is gathered and multiplied while it is
    # in cache: gathering all `top` rows first and multiplying after read them twice from memory (36 vs 21 ms).
    a_rows = a_ctx.reshape(num_kv, columns, n_context).transpose(1, 2).reshape(num_kv * n_context, columns)
    v_rows = values[:, :n_context].reshape(num_kv * n_context, head_dim)

    kept_num = torch.zeros(num_policies, num_kv, columns, head_dim)
    kept_mass = torch.zeros(num_policies, num_kv, columns)
    if grads is not None:  # (K, H, S, D) -> (K, H_kv, G*S, D), the columns laid out as o_full's
        grads = grads.float().reshape(grads.shape[0], num_kv, columns, head_dim)
    lost, err, dots = [], [], []
    start = 0
    for budget in budgets:
        end = min(int(budget), n_context)
        if end > start:
            index = rows[..., start:end].reshape(-1)
            segment = a_rows.index_select(0, index).view(num_policies, num_kv, end - start, columns)
            v_segment = v_rows.index_select(0, index).view(num_policies, num_kv, end - start, head_dim)
            kept_num += segment.transpose(-1, -2) @ v_segment  # (P, H_kv, G*S, D)
            kept_mass += segment.sum(dim=-2)
            start = end
        o_kept = (kept_num + suf_num) / (kept_mass + suf_mass).clamp_min(EPS)[..., None]  # (P, H_kv, G*S, D)
        change = o_kept - o_full  # (P, H_kv, G*S, D)
        err.append((change.norm(dim=-1) / o_norm).mean(dim=-1))  # (P, H_kv)
        lost.append((ctx_mass - kept_mass).clamp_min(0).mean(dim=-1))  # (P, H_kv)
        if grads is not None:
            dots.append(torch.einsum("phcd,khcd->pkh", change, grads))  # (P, K, H_kv)
    found = (torch.stack(lost, dim=-1), torch.stack(err, dim=-1))  # (P, H_kv, G) each
    return (*found, torch.stack(dots, dim=-1)) if grads is not None else found
