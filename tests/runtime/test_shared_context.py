"""Probes' rows sharing one context (SharedContextLayer): attention over the shared context and each row's own
appended tokens is SDPA's over the dense cache, and the engine's batched probes measure what each plan measures
alone on a dense cache."""

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import polykv_search.runtime.attention as attention
from polykv_search.data import load_samples
from polykv_search.engine import PrefillEngine
from polykv_search.plan import HeadPlan, LayerPlan, Plan
from polykv_search.runtime.shared import SharedContextLayer, shared_context_attention
from tests.conftest import sample_rows, sdpa_module, tiny_loaded, write_jsonl
from tests.plans import TEST

H, H_KV, D = 6, 3, 8


@pytest.mark.parametrize("q_len", [1, 4, 7])
def test_attention_is_sdpa_over_the_dense_cache(q_len):
    torch.manual_seed(0)
    batch, context, earlier = 3, 11, 7 - q_len  # `earlier` tokens were appended by a previous call
    keys, values = torch.randn(1, H_KV, context, D, dtype=torch.float64), torch.randn(1, H_KV, context, D,
                                                                                      dtype=torch.float64)
    layer = SharedContextLayer(keys, values, batch, room=10)
    query = torch.randn(batch, H, q_len, D, dtype=torch.float64)
    if earlier:
        layer.update(torch.randn(batch, H_KV, earlier, D, dtype=torch.float64),
                     torch.randn(batch, H_KV, earlier, D, dtype=torch.float64))
    new_k, new_v = torch.randn(batch, H_KV, q_len, D, dtype=torch.float64), torch.randn(batch, H_KV, q_len, D,
                                                                                        dtype=torch.float64)
    key, value = layer.update(new_k, new_v)
    assert key.shape == (batch, H_KV, context + earlier + q_len, D) == (batch, H_KV, layer.get_seq_length(), D)
    dense_k = torch.cat([keys.expand(batch, -1, -1, -1), key.own], dim=2)
    dense_v = torch.cat([values.expand(batch, -1, -1, -1), value.own], dim=2)
    total = dense_k.shape[2]
    mask = torch.ones(q_len, total, dtype=torch.bool).tril_(total - q_len)[None, None]  # bottom-right causal
    expected = sdpa_attention_forward(sdpa_module(H, H_KV), query, dense_k, dense_v, mask, scaling=D ** -0.5)[0]
    got = shared_context_attention(query, key, value, scaling=D ** -0.5)
    assert got.shape == (batch, q_len, H, D)
    torch.testing.assert_close(got, expected)


def test_the_context_is_not_copied_and_overflow_is_refused():
    keys = torch.randn(1, H_KV, 5, D)
    layer = SharedContextLayer(keys, keys.clone(), batch=2, room=3)
    assert layer.keys.context.data_ptr() == keys.data_ptr()
    with pytest.raises(ValueError, match="appended tokens"):
        layer.update(torch.randn(2, H_KV, 4, D), torch.randn(2, H_KV, 4, D))


@pytest.fixture(scope="module", params=["llama", "gemma"])
def setup(request, tmp_path_factory):
    lm = tiny_loaded(request.param)
    samples = load_samples(write_jsonl(tmp_path_factory.mktemp("s") / "s.jsonl", sample_rows(1, words=250)))
    engine = PrefillEngine(lm, scorers=["h2o_recent", "snapkv"])
    return lm, engine, engine.prefill(samples[0])


def _one_head(lm, layer: int, head: int, policy: str, budget: int) -> Plan:
    entries = [HeadPlan.full()] * lm.info.num_kv_heads
    entries[head] = HeadPlan.of(policy, budget)
    layers = list(Plan.full(lm.info).layers)
    layers[layer] = LayerPlan(index=layer, policy=None, heads=tuple(entries))
    return Plan.build(lm.info, layers=layers, search=TEST)


def test_batched_probes_measure_what_each_plan_measures_alone(setup, monkeypatch):
    lm, engine, state = setup
    calls = []
    monkeypatch.setattr(attention, "shared_context_attention",
                        lambda *a, **k: calls.append(1) or shared_context_attention(*a, **k))
    plans = [_one_head(lm, layer, head, policy, 12) for layer in lm.info.compressible_layers
             for head in range(lm.info.num_kv_heads) for policy in ("h2o_recent", "snapkv")] + [None]
    batched = engine.answer_metrics_many(state, plans, batch_size=3)
    assert calls, "the probes did not run on shared-context layers"
    full = state.full_logprobs
    for plan, measured in zip(plans, batched):
        alone = engine.answer_logprobs(state, plan)  # batch 1, a dense cache
        kl = float((full.exp() * (full - alone)).sum(-1).mean())
        assert measured["kl"] == pytest.approx(kl, abs=1e-5)
    assert max(m["kl"] for m in batched) > 1e-4  # the probes changed something
