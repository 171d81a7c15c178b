"""polykv_sdpa with a validity mask per KV head: each head attends to its own kept slots only, on both the
grouped path and SDPA's path (dropout / soft-capped models), and a (B, K) mask still means every head."""

import types

import pytest
import torch

from polykv_search.runtime.attention import polykv_sdpa_forward

H, H_KV, D, K = 6, 3, 8, 10


def _module(valid: torch.Tensor, softcap: float | None = None) -> torch.nn.Module:
    module = torch.nn.Module()
    module.config = types.SimpleNamespace(attn_logit_softcapping=None)
    module.polykv_valid = valid
    module.polykv_compressed = True
    module.is_causal = True
    if softcap:  # only routes the call to SDPA's path; the numbers are compared with softcap-free references
        module.attn_logit_softcapping = softcap
    return module


def _reference(query, key, value, valid, k_len):
    """Per batch row and query head: softmax over the keys its KV head keeps (new keys always kept), causal."""
    batch, _, q_len, _ = query.shape
    out = torch.zeros(batch, q_len, H, D)
    for b in range(batch):
        for h in range(H):
            kv = h // (H // H_KV)
            keep = torch.ones(k_len, dtype=torch.bool)
            keep[:valid.shape[-1]] = valid[b, kv] if valid.dim() == 3 else valid[b]
            for i in range(q_len):
                visible = keep.clone()
                visible[k_len - q_len + i + 1:] = False
                logits = (query[b, h, i] @ key[b, kv, visible].T) * D ** -0.5
                out[b, i, h] = torch.softmax(logits, -1) @ value[b, kv, visible]
    return out


@pytest.mark.parametrize("q_len", [1, 3])
@pytest.mark.parametrize("per_head", [True, False])
def test_each_kv_head_sees_only_its_kept_slots(q_len, per_head):
    gen = torch.Generator().manual_seed(q_len)
    k_len = K + q_len
    query = torch.randn(2, H, q_len, D, generator=gen)
    key, value = torch.randn(2, H_KV, k_len, D, generator=gen), torch.randn(2, H_KV, k_len, D, generator=gen)
    valid = torch.rand(2, H_KV, K, generator=gen) > 0.4 if per_head else torch.rand(2, K, generator=gen) > 0.4
    valid[..., 0] = True  # every head keeps at least one context slot
    out, _ = polykv_sdpa_forward(_module(valid), query, key, value, None)
    torch.testing.assert_close(out, _reference(query, key, value, valid, k_len), atol=1e-5, rtol=1e-5)


def test_sdpa_path_takes_a_per_head_mask(monkeypatch):
    """The soft-capped path hands the mask to transformers' SDPA, whose mask is per query head."""
    seen = {}

    def fake_sdpa(module, query, key, value, mask, *args, **kwargs):
        seen["mask"] = mask
        return query.transpose(1, 2), None

    monkeypatch.setattr("polykv_search.runtime.attention.sdpa_attention_forward", fake_sdpa)
    valid = torch.zeros(1, H_KV, K, dtype=torch.bool)
    valid[0, 1, :4] = True
    query = torch.randn(1, H, 1, D)
    key = value = torch.randn(1, H_KV, K + 1, D)
    polykv_sdpa_forward(_module(valid, softcap=50.0), query, key, value, None)
    mask = seen["mask"]
    assert mask.shape == (1, H, 1, K + 1)
    group = H // H_KV
    for h in range(H):
        expected = torch.cat([valid[0, h // group], torch.ones(1, dtype=torch.bool)])
        assert torch.equal(mask[0, h, 0], expected)
