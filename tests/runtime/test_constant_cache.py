"""The attention for calibrate's answer gradients: cached keys and values are constants to autograd. Its output is
SDPA's, and the gradients it gives the queries and the new tokens' keys and values are those of SDPA's backward."""

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from polykv_search.runtime.attention import constant_cache_attention
from tests.conftest import sdpa_module

H, H_KV, D = 6, 3, 8


def test_same_output_and_gradients_as_sdpa_with_the_cache_held_constant():
    torch.manual_seed(0)
    cached, q_len = 13, 5
    query = torch.randn(2, H, q_len, D, dtype=torch.float64, requires_grad=True)
    old_k, old_v = torch.randn(2, H_KV, cached, D, dtype=torch.float64), torch.randn(2, H_KV, cached, D,
                                                                                    dtype=torch.float64)
    new_k = torch.randn(2, H_KV, q_len, D, dtype=torch.float64, requires_grad=True)
    new_v = torch.randn(2, H_KV, q_len, D, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, q_len, H, D, dtype=torch.float64)  # a loss that reads every output

    def grads(attend):
        key, value = torch.cat([old_k, new_k], dim=2), torch.cat([old_v, new_v], dim=2)
        out = attend(key, value)
        return out, torch.autograd.grad((out * weight).sum(), [query, new_k, new_v])

    mask = torch.ones(q_len, cached + q_len, dtype=torch.bool).tril_(cached)[None, None]  # bottom-right causal
    out_sdpa, g_sdpa = grads(lambda k, v: sdpa_attention_forward(sdpa_module(H, H_KV), query, k, v, mask, scaling=D ** -0.5)[0])
    out_here, g_here = grads(lambda k, v: constant_cache_attention(query, k, v, D ** -0.5)[0])
    assert out_here.shape == out_sdpa.shape == (2, q_len, H, D)
    torch.testing.assert_close(out_here, out_sdpa)
    for mine, theirs in zip(g_here, g_sdpa):
        assert theirs.abs().sum() > 0
        torch.testing.assert_close(mine, theirs)
