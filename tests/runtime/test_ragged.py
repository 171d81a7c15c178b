"""The ragged cache: a per-head plan applied by PlanPress holds exactly each KV head's kept tokens and answers as the
dense masked reference (the engine: every head padded, the padding hidden per head) does, in a teacher-forced
forward of several tokens, token-by-token decoding, model.generate and kvpress's pipeline."""

import pytest
import torch
from kvpress import KVPressTextGenerationPipeline
from transformers import DynamicCache

from polykv_search.data import load_samples
from polykv_search.engine import PrefillEngine
from polykv_search.plan import HeadPlan, LayerPlan, Plan
from polykv_search.runtime import PlanPress, apply_plan, polykv_attention
from polykv_search.runtime.ragged import RaggedKV, RaggedLayer
from tests.conftest import kvpress_answer, sample_rows, tiny_loaded, write_jsonl
from tests.plans import TEST

POLICIES = ["snapkv", "h2o_recent", "knorm"]


@pytest.fixture(scope="module", params=["llama", "gemma"])
def setup(request, tmp_path_factory):
    lm = tiny_loaded(request.param, seed=4)
    samples = load_samples(write_jsonl(tmp_path_factory.mktemp("r") / "s.jsonl", sample_rows(2, words=220)))
    engine = PrefillEngine(lm, scorers=POLICIES)
    return lm, engine, [engine.prefill(s) for s in samples]


def ragged_plan(lm) -> Plan:
    """Every compressible layer's KV heads keep 6, 40, ... tokens of different policies (a head may keep all)."""
    heads = lm.info.num_kv_heads
    layers = [LayerPlan(index=i, policy=None, heads=tuple(
        HeadPlan.of(POLICIES[(i + h) % 3], 6 + 34 * h + 3 * i) for h in range(heads)))
        for i in lm.info.compressible_layers]
    return Plan.build(lm.info, layers=layers, search=TEST)


def compressed(lm, state, press):
    cache = DynamicCache(config=lm.model.config)
    with torch.no_grad(), press(lm.model):
        lm.model.model(input_ids=torch.tensor([state.parts.context_ids]), past_key_values=cache)
    return cache


def test_each_kv_head_holds_exactly_its_kept_tokens(setup):
    lm, engine, states = setup
    plan = ragged_plan(lm)
    press = PlanPress(plan)
    cache = compressed(lm, states[0], press)
    for idx in lm.info.compressible_layers:
        layer = cache.layers[idx]
        budgets = [head.budget for head in plan.layers[idx].heads]
        assert isinstance(layer, RaggedLayer) and layer.head_lengths == budgets
        bytes_per_entry = 2 * lm.info.head_dim * layer.dtype.itemsize  # a key and a value
        assert layer.nbytes == sum(budgets) * bytes_per_entry  # nothing padded, no room reserved
        ours = engine.kept_indices(states[0], plan)[idx]
        assert all(torch.equal(a, b) for a, b in zip(ours, press.kept_indices[idx]))
    for idx, kind in enumerate(lm.info.layer_types):
        if kind == "sliding_attention":
            assert not isinstance(cache.layers[idx], RaggedLayer)  # the architecture's window, untouched


def test_teacher_forced_logits_equal_the_dense_masked_reference(setup):
    lm, engine, states = setup
    plan = ragged_plan(lm)
    for state in states:
        cache = compressed(lm, state, PlanPress(plan))
        suffix = list(state.parts.question_ids) + list(state.parts.answer_ids)
        n = state.n_context
        with torch.no_grad(), polykv_attention(lm.model):
            logits = lm.model(input_ids=torch.tensor([suffix]), past_key_values=cache,
                              position_ids=torch.arange(n, n + len(suffix))[None]).logits[0]
        ours = torch.log_softmax(logits[len(state.parts.question_ids) - 1:-1].float(), dim=-1)  # (A, V)
        torch.testing.assert_close(ours, engine.answer_logprobs(state, plan), atol=2e-4, rtol=1e-4)


def test_decoding_generate_and_kvpress_answer_as_the_engine_does(setup):
    lm, engine, states = setup
    plan = ragged_plan(lm)
    pipe = KVPressTextGenerationPipeline(model=lm.model, tokenizer=lm.tokenizer)
    for state in states:
        expected = engine.run(state, plan, with_kl=False).answer
        assert kvpress_answer(pipe, state, PlanPress(plan)) == expected  # question, then token by token
    state = states[0]
    ids = torch.tensor([state.parts.context_ids + state.parts.question_ids])
    with apply_plan(lm.model, plan):
        generated = lm.model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1]:].tolist()
    cache = DynamicCache(config=lm.model.config)  # generate compresses the whole prompt: so does this loop
    tokens = []
    with torch.no_grad(), polykv_attention(lm.model):
        with PlanPress(plan)(lm.model):
            out = lm.model(input_ids=ids, past_key_values=cache)
        for step in range(6):
            tokens.append(int(out.logits[0, -1].argmax()))
            out = lm.model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache,
                           position_ids=torch.tensor([[ids.shape[1] + step]]))
    assert any(isinstance(layer, RaggedLayer) for layer in cache.layers)
    assert generated == tokens[:len(generated)] and len(generated) >= 1


def test_cutting_and_growing_a_ragged_layer():
    keys = [torch.randn(n, 4) for n in (3, 7)]
    layer = RaggedLayer([keys], [[k + 1 for k in keys]])
    assert layer.get_seq_length() == 7
    for step in range(40):  # decoding appends to every head, growing the buffers past their first size
        layer.update(torch.full((1, 2, 1, 4), float(step)), torch.full((1, 2, 1, 4), float(step)))
    assert layer.head_lengths == [43, 47] and layer.get_seq_length() == 47
    assert torch.equal(layer.keys.heads[1][7:], torch.arange(40.0)[:, None].expand(40, 4))
    layer.keys = layer.keys[:, :, :17]  # kvpress's pipeline removing an answer of 30 tokens
    layer.values = layer.values[:, :, :17]
    assert layer.head_lengths == [13, 17] and torch.equal(layer.keys.heads[0][:3], keys[0])
    layer.crop(-5)
    assert layer.head_lengths == [8, 12]
    with pytest.raises(ValueError, match="cannot cut"):
        layer.keys[:, :, :2]
    with pytest.raises(TypeError, match="can only be cut"):
        layer.keys = torch.zeros(1, 2, 3, 4)
    assert isinstance(layer.keys, RaggedKV) and layer.keys.shape == (1, 2, 12, 4)
