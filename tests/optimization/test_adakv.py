"""Ada-KV as a per-head plan: each KV head keeps the tokens kvpress's AdaKVPress keeps (its own top-k, the layer's
budget shared across heads by the scores, with the safeguard), on the same prefill."""

import pytest
import torch
from kvpress import AdaKVPress, SnapKVPress
from transformers import DynamicCache

from polykv_search.data import load_samples
from polykv_search.engine import PrefillEngine
from polykv_search.errors import ConfigError
from polykv_search.models.anatomy import decoder_layers
from polykv_search.optimization import adakv_plan
from tests.conftest import sample_rows, tiny_loaded, write_jsonl


@pytest.mark.parametrize("budget", [72, 120])  # above SnapKV's window of 64, whose tokens tie in every head
def test_adakv_keeps_what_kvpress_adakv_keeps(tmp_path, budget):
    lm = tiny_loaded("llama", seed=5)
    sample = load_samples(write_jsonl(tmp_path / "s.jsonl", sample_rows(1, words=200)))[0]
    engine = PrefillEngine(lm, scorers=["snapkv"])
    state = engine.prefill(sample)
    n = state.n_context
    plan = adakv_plan(lm.info, {idx: r["snapkv"] for idx, r in state.rankings.items()}, policy="snapkv",
                      budget=budget, n_context=n)
    ours = engine.kept_indices(state, plan)

    press = AdaKVPress(SnapKVPress(compression_ratio=1 - (budget + 0.5) / n))  # kvpress keeps int(n (1 - r))
    layers = decoder_layers(lm.model)
    try:
        with torch.no_grad(), press(lm.model):
            lm.model.model(input_ids=torch.tensor([state.parts.context_ids]),
                           past_key_values=DynamicCache(config=lm.model.config))
        for idx in lm.info.compressible_layers:
            _, heads, positions = layers[idx].self_attn.masked_key_indices  # what kvpress prunes
            for h in range(lm.info.num_kv_heads):
                pruned = set(positions[heads == h].tolist())
                assert set(ours[idx][h].tolist()) == set(range(n)) - pruned, (idx, h)
            counts = [len(k) for k in ours[idx]]
            assert sum(counts) == budget * lm.info.num_kv_heads and min(counts) >= max(1, int(0.2 * budget))
    finally:
        for layer in layers:
            layer.self_attn.__dict__.pop("masked_key_indices", None)  # kvpress leaves it on the modules
    assert plan.per_head and plan.constraint.total_realised == budget * lm.info.num_kv_heads * len(layers)


def test_adakv_refuses_a_zero_safeguard():
    lm = tiny_loaded("llama")
    with pytest.raises(ConfigError, match="alpha_safeguard"):
        adakv_plan(lm.info, {}, budget=8, n_context=100, alpha_safeguard=0.0)


def test_with_one_kv_head_adakv_is_the_uniform_policy(tmp_path):
    """Gemma-3-270M has one KV head a layer: there is nothing to share across heads."""
    lm = tiny_loaded("gemma")
    lm = type(lm)(model=lm.model, tokenizer=lm.tokenizer, info=type(lm.info)(**{**lm.info.to_dict(),
                                                                                  "num_kv_heads": 1}))
    scores = {idx: torch.rand(1, 120) for idx in lm.info.compressible_layers}
    plan = adakv_plan(lm.info, scores, policy="snapkv", budget=16, n_context=120)
    assert all(layer.heads is not None and [h.budget for h in layer.heads] == [16]
               for layer in plan.layers if not layer.sliding_window)


def test_adakv_needs_scores_that_compare_across_heads():
    lm = tiny_loaded("llama")
    with pytest.raises(ConfigError, match="ranks by position"):
        adakv_plan(lm.info, {}, policy="streaming", budget=8, n_context=100)
