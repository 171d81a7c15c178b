"""PlanPress and apply_plan: per-layer cache lengths work with generate, manual decode loops and
forwards of several query tokens; Gemma-3's sliding-window layers keep working."""

import pytest
import torch
from transformers import DynamicCache

from polykv_search.errors import PlanError
from polykv_search.runtime import PlanPress, apply_plan, polykv_attention
from tests.conftest import tiny_loaded
from tests.plans import plan_of, uniform_of

IDS = torch.randint(3, 60, (1, 100), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def llama():
    return tiny_loaded("llama")


def test_keeping_everything_changes_nothing(llama):
    plain = llama.model.generate(IDS, max_new_tokens=8, do_sample=False)
    with apply_plan(llama.model, uniform_of(llama.info, "snapkv", 500)):
        same = llama.model.generate(IDS, max_new_tokens=8, do_sample=False)
    assert torch.equal(plain, same)


def test_generate_matches_a_manual_loop_with_per_layer_lengths(llama):
    press = PlanPress(plan_of(llama.info, ["snapkv", "knorm", "tova"], [20, 50, 70]))
    with apply_plan(llama.model, press):
        generated = llama.model.generate(IDS, max_new_tokens=8, do_sample=False)[0, 100:].tolist()
    cache = DynamicCache(config=llama.model.config)
    with press(llama.model):
        out = llama.model(input_ids=IDS, past_key_values=cache, use_cache=True)
    assert [layer.keys.shape[2] for layer in cache.layers] == [20, 50, 70]
    tokens = [int(out.logits[0, -1].argmax())]
    with torch.no_grad(), polykv_attention(llama.model):
        for step in range(7):
            out = llama.model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache,
                              position_ids=torch.tensor([[100 + step]]))
            tokens.append(int(out.logits[0, -1].argmax()))
    assert generated == tokens


@pytest.mark.parametrize("kind", ["llama", "gemma"])
def test_multi_token_forward_equals_token_by_token(kind):
    lm = tiny_loaded(kind)
    n_layers = lm.info.num_layers
    budgets = [None if t == "sliding_attention" else 12 + 9 * i for i, t in enumerate(lm.info.layer_types)]
    policies = [None if b is None else "expected_attention" for b in budgets]
    press = PlanPress(plan_of(lm.info, policies, budgets))

    def compressed():
        cache = DynamicCache(config=lm.model.config)
        with torch.no_grad(), press(lm.model):
            lm.model(input_ids=IDS[:, :80], past_key_values=cache, use_cache=True)
        return cache

    extra = IDS[:, 80:90]
    first = compressed()
    lengths = [layer.keys.shape[2] for layer in first.layers]
    assert len(set(lengths)) > 1 and len(lengths) == n_layers
    with torch.no_grad(), polykv_attention(lm.model):
        multi = lm.model(input_ids=extra, past_key_values=first, position_ids=torch.arange(80, 90)[None]).logits[0]
        second = compressed()
        steps = [lm.model(input_ids=extra[:, i:i + 1], past_key_values=second,
                          position_ids=torch.tensor([[80 + i]])).logits[0, -1] for i in range(10)]
    torch.testing.assert_close(multi, torch.stack(steps), atol=1e-4, rtol=1e-4)


def test_layer_count_mismatch_is_refused(llama):
    gemma = tiny_loaded("gemma")
    with pytest.raises(PlanError, match="plan has 4 layers but the model has 3"):
        with PlanPress(uniform_of(gemma.info, "snapkv", 8))(llama.model):
            pass
