"""H2O's column sums observed inside the model's own attention equal the recomputed ones, and the model's
outputs do not change when its prefill attention is observed."""

import pytest
import torch
from transformers import DynamicCache

from polykv_search.calibration.capture import LayerCapture
from polykv_search.policies.scoring import query_chunks
from polykv_search.runtime import attention as runtime_attention
from tests.conftest import tiny_loaded

T = 150


def _prefill(lm, ids, *, observe: bool):
    capture = LayerCapture(lm.model, lm.info, policies=["h2o", "snapkv"], budgets=[16, 64], window=16)
    capture.chunk_elements = 20 * T  # 20-row chunks: several chunks, and a final one of at least the window
    with capture.attached(), torch.no_grad():
        if not observe:
            for idx in capture.layer_ids:
                lm.model.model.layers[idx].self_attn.__dict__.pop("polykv_observe", None)
        capture.start_sample(T)
        capture.phase = "prefill"
        logits = lm.model(input_ids=ids, past_key_values=DynamicCache(config=lm.model.config), use_cache=True).logits
        state = capture.rankings()
        signals = {k: v.clone() for k, v in capture.finish_sample().signals.items()}
    return logits, state, signals


def test_observed_prefill_matches_recomputed_attention(monkeypatch):
    calls = []
    original = runtime_attention.observed_attention  # what the polykv_sdpa attention calls to observe a prefill
    monkeypatch.setattr(runtime_attention, "observed_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    lm = tiny_loaded("llama", seed=2, attn="sdpa")
    ids = torch.randint(3, 60, (1, T), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        plain = lm.model(input_ids=ids).logits
    fused_logits, fused, fused_sig = _prefill(lm, ids, observe=True)
    assert len(calls) == len(lm.info.compressible_layers)  # the fused path ran, once per layer
    ref_logits, ref, ref_sig = _prefill(lm, ids, observe=False)
    assert len(calls) == len(lm.info.compressible_layers)  # and the reference did not use it
    torch.testing.assert_close(fused_logits, plain, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(ref_logits, plain, atol=2e-5, rtol=1e-4)
    for idx in fused:
        torch.testing.assert_close(fused[idx]["h2o"], ref[idx]["h2o"], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(fused[idx]["snapkv"], ref[idx]["snapkv"])
    for name in ("entropy", "variance"):  # CAKE's window signals come from the observed final chunk
        torch.testing.assert_close(fused_sig[name], ref_sig[name], atol=1e-5, rtol=1e-4, equal_nan=True)
    assert not any("polykv_observe" in vars(layer.self_attn) for layer in lm.model.model.layers)  # cleaned up
    assert lm.model.config._attn_implementation == "sdpa"  # restored


def test_query_chunks_cover_every_query_once_and_end_with_the_window():
    for n in (1, 15, 16, 17, 100, 1000):
        for last in (0, 16, 64):
            chunks = query_chunks(n, chunk_elements=20 * n, last=last)
            covered = [i for start, stop in chunks for i in range(start, stop)]
            assert covered == list(range(n))
            assert chunks[-1][1] - chunks[-1][0] >= min(n, last)


def test_the_cpu_kernel_path_equals_the_chunked_softmax():
    """On CPU a plain causal prefill takes SDPA's output and log-sum-exp and only sums the probabilities; an explicit
    mask takes the chunked softmax. Both give the same output, column sums and final chunk."""
    from polykv_search.policies.scoring import observed_attention
    module = torch.nn.Module()
    module.config = type("Config", (), {})()
    torch.manual_seed(0)
    n, heads, kv, dim = 70, 6, 2, 8
    query, key, value = torch.randn(1, heads, n, dim), torch.randn(1, kv, n, dim), torch.randn(1, kv, n, dim)
    causal = torch.ones(n, n, dtype=torch.bool).tril_()[None, None]
    fast = observed_attention(module, query, key, value, None, dim ** -0.5, last=16, chunk_elements=20 * n)
    slow = observed_attention(module, query, key, value, causal, dim ** -0.5, last=16, chunk_elements=20 * n)
    torch.testing.assert_close(fast[0], slow[0], atol=1e-5, rtol=1e-4)
    for mine, theirs in zip(fast[1], slow[1]):
        assert mine.shape == theirs.shape
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-4)
    assert fast[1][0].sum() == pytest.approx(heads * n, rel=1e-4)  # every query's probabilities sum to 1
