"""Recomputed attention equals the model's own eager attention weights (Llama and Gemma-3 geometry)."""

import pytest
import torch

from polykv_search.models.anatomy import decoder_layers
from polykv_search.policies.attention import attention_probs
from tests.conftest import tiny_loaded


@pytest.mark.parametrize("kind", ["llama", "gemma"])
def test_matches_eager_attention_weights(kind):
    lm = tiny_loaded(kind, attn="eager")
    captured = {}

    def hook(module, args, kwargs, output):
        cache = kwargs["past_key_values"].layers[module.layer_idx]
        captured[module.layer_idx] = (kwargs["hidden_states"], cache.keys, kwargs["position_embeddings"], output[1])

    layers = decoder_layers(lm.model)
    full = [i for i, t in enumerate(lm.info.layer_types) if t == "full_attention"]
    handles = [layers[i].self_attn.register_forward_hook(hook, with_kwargs=True) for i in full]
    ids = torch.randint(3, 60, (1, 40))
    try:
        with torch.no_grad():
            lm.model(input_ids=ids, use_cache=True)
    finally:
        for h in handles:
            h.remove()
    for idx in full:
        hidden, keys, (cos, sin), weights = captured[idx]  # weights (1, H, T, T)
        module = layers[idx].self_attn
        for start, stop in [(0, 40), (10, 25), (32, 40)]:
            probs = attention_probs(module, hidden[:, start:stop], keys, (cos[:, start:stop], sin[:, start:stop]),
                                    first_position=start, pad_to=40)
            torch.testing.assert_close(probs, weights[0, :, start:stop].float(), atol=2e-5, rtol=1e-4)
