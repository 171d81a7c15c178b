"""A trtllm plan answered as TensorRT-LLM computes it (`PrefillEngine.run_windowed`): each layer attends through a
window of its budget in the prefill and in every later step. Checked against transformers' own sliding-window
layers (Qwen2 with per-layer `layer_types`), which compute that band with a cache that drops what leaves it."""

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from polykv_search.data import load_samples
from polykv_search.engine import PrefillEngine
from polykv_search.errors import ConfigError
from polykv_search.models import LoadedModel, model_info
from polykv_search.runtime import attention as attention_module
from polykv_search.runtime.attention import attention_windows, polykv_attention
from polykv_search.models.anatomy import decoder_layers
from tests.conftest import make_tokenizer, sample_rows, tiny_loaded, write_jsonl
from tests.plans import plan_of

WINDOW = 24


def qwen2_pair():
    """The same random weights twice: layers 0 and 2 full attention and layer 1 a 24-token sliding window
    (transformers' own), and every layer full attention (to be windowed by polykv_attention)."""
    tokenizer = make_tokenizer()
    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, bos_token_id=1,
                  eos_token_id=2, pad_token_id=2, num_hidden_layers=3)
    torch.manual_seed(0)
    windowed = Qwen2Config(use_sliding_window=True, sliding_window=WINDOW,
                           layer_types=["full_attention", "sliding_attention", "full_attention"], **common)
    reference = AutoModelForCausalLM.from_config(windowed, attn_implementation="sdpa").eval()
    for param in reference.parameters():
        param.data.mul_(4.0 if param.dim() > 1 else 1.0)
    full = AutoModelForCausalLM.from_config(Qwen2Config(**common), attn_implementation="sdpa").eval()
    full.load_state_dict(reference.state_dict())
    info = model_info(full, model_id="tiny-qwen2", revision="test", add_bos=False)
    return reference, LoadedModel(model=full, tokenizer=tokenizer, info=info)


@pytest.fixture(scope="module")
def pair():
    return qwen2_pair()


@pytest.mark.parametrize("block", [512, 16])  # 16: the prefill runs in blocks, each over the keys its band reaches
@torch.inference_mode()
def test_window_prefill_and_rolling_decode_equal_transformers_sliding_layer(pair, block, monkeypatch):
    monkeypatch.setattr(attention_module, "WINDOW_BLOCK", block)
    reference, lm = pair
    ids = torch.randint(3, 60, (1, 90), generator=torch.Generator().manual_seed(1))
    ref_out = reference(input_ids=ids[:, :80], use_cache=True)
    layers = decoder_layers(lm.model)
    with polykv_attention(lm.model), attention_windows(layers, {1: WINDOW}):
        out = lm.model(input_ids=ids[:, :80], use_cache=True)
        assert torch.allclose(out.logits, ref_out.logits, atol=1e-4)
        cache, ref_cache = out.past_key_values, ref_out.past_key_values
        for step in range(80, 90):  # the window rolls over decoded tokens
            token = ids[:, step:step + 1]
            ref_logits = reference(input_ids=token, past_key_values=ref_cache, use_cache=True).logits
            logits = lm.model(input_ids=token, past_key_values=cache, use_cache=True).logits
            assert torch.allclose(logits, ref_logits, atol=1e-4)
    plain = lm.model(input_ids=ids[:, :80]).logits  # the window is gone after the block
    assert not torch.allclose(plain, ref_out.logits, atol=1e-3)


@torch.inference_mode()
def test_run_windowed_is_the_sliding_models_answer(pair, tmp_path):
    reference, lm = pair
    sample = load_samples(write_jsonl(tmp_path / "e.jsonl", sample_rows(1, words=120)))[0]
    engine = PrefillEngine(lm, scorers=["streaming"])
    state = engine.prefill(sample)
    plan = plan_of(lm.info, ("streaming",) * 3, (10_000, WINDOW, 10_000))  # layers 0 and 2 keep everything
    answer = engine.run_windowed(state, [plan])[0]
    parts = state.parts
    prompt = list(parts.context_ids) + list(parts.question_ids)
    teacher = torch.tensor([prompt + list(parts.answer_ids)])
    ref_logprobs = torch.log_softmax(reference(input_ids=teacher).logits[0, len(prompt) - 1:-1].float(), dim=-1)
    full = state.full_logprobs
    ref_kl = float((full.exp() * (full - ref_logprobs)).sum(-1).mean())
    assert answer.kl == pytest.approx(ref_kl, abs=1e-4) and ref_kl > 1e-3
    tokens, cache = torch.tensor([prompt]), None
    generated = []
    for _ in range(len(lm.tokenizer(answer.answer)["input_ids"]) + 2):
        out = reference(input_ids=tokens, past_key_values=cache, use_cache=True)
        cache, tokens = out.past_key_values, out.logits[:, -1:].argmax(-1)
        generated.append(int(tokens))
    assert lm.tokenizer.decode(generated, skip_special_tokens=True).startswith(answer.answer.strip())
    assert answer.answer.strip() and answer.kept_all_layers == [0, 2]
    assert engine.prefills == 2  # the shared prefill and the plan's own


def test_run_windowed_refuses_a_plan_that_is_no_window(pair, tmp_path):
    _, lm = pair
    sample = load_samples(write_jsonl(tmp_path / "e.jsonl", sample_rows(1, words=60)))[0]
    engine = PrefillEngine(lm, scorers=["streaming", "snapkv"])
    state = engine.prefill(sample)
    with pytest.raises(ConfigError, match="layer 1 of the plan is no attention window"):
        engine.run_windowed(state, [plan_of(lm.info, ("streaming", "snapkv", "streaming"), (20, 20, 20))])


def test_run_windowed_on_a_model_with_sliding_layers_prefills_once_per_plan(tmp_path):
    """Gemma-3's own sliding layers cannot be cropped after the teacher-forced answer: they are put back as they were
    after the prefill, so the greedy answer is the one decoded straight after the prefill, with no second prefill."""
    lm = tiny_loaded("gemma")
    sample = load_samples(write_jsonl(tmp_path / "e.jsonl", sample_rows(1, words=120)))[0]
    engine = PrefillEngine(lm, scorers=["streaming"])
    state = engine.prefill(sample)
    plan = plan_of(lm.info, ("streaming",) * 4, (None, 24, None, 40))  # layers 1 and 3: the full-attention ones
    decoded = engine.run_windowed(state, [plan], with_kl=False)[0]
    before = engine.prefills
    measured = engine.run_windowed(state, [plan])[0]
    assert engine.prefills == before + 1
    assert measured.kl is not None and measured.kl > 1e-4 and measured.answer == decoded.answer != ""


@pytest.mark.parametrize("family", ["llama", "gemma"])
@torch.inference_mode()
def test_window_metrics_equal_a_windowed_run_of_one_layer(family, tmp_path):
    """`window_metrics` (one forward from the probed layer over the whole prompt) measures what `run_windowed`
    measures for a plan windowing that layer alone (a context prefill, then the question and answer)."""
    lm = tiny_loaded(family)
    sample = load_samples(write_jsonl(tmp_path / "e.jsonl", sample_rows(1, words=120)))[0]
    engine = PrefillEngine(lm, scorers=["streaming"])
    state = engine.prefill(sample)
    layers = lm.info.compressible_layers
    probes = [(layers[0], 16), (layers[-1], 16), (layers[-1], 40)]
    metrics = engine.window_metrics(state, probes)
    answer = torch.tensor(state.parts.answer_ids)
    for (layer, window), measured in zip(probes, metrics):
        n = lm.info.num_layers
        plan = plan_of(lm.info, tuple("streaming" if i == layer else None for i in range(n)),
                       tuple(window if i == layer else None for i in range(n)))
        assert measured["kl"] == pytest.approx(engine.run_windowed(state, [plan])[0].kl, abs=1e-4)
        with polykv_attention(lm.model), attention_windows(engine.layers, {layer: window}):
            prompt = list(state.parts.context_ids) + list(state.parts.question_ids)
            logits = lm.model(input_ids=torch.tensor([prompt + list(state.parts.answer_ids)])).logits
        logprobs = torch.log_softmax(logits[0, len(prompt) - 1:-1].float(), dim=-1)
        assert measured["nll"] == pytest.approx(float(-logprobs.gather(-1, answer[:, None]).mean()), abs=1e-4)
    assert metrics[1]["kl"] > 1e-4 and metrics[1]["kl"] != pytest.approx(metrics[2]["kl"], abs=1e-6)


@torch.inference_mode()
def test_window_metrics_around_a_background_equal_a_windowed_run_of_every_layer(tmp_path):
    """With `background` windows on the other layers, a probe measures what `run_windowed` measures for the plan
    that windows every layer (the probe's window replacing its layer's), and differs from the probe without it."""
    lm = tiny_loaded("llama")
    sample = load_samples(write_jsonl(tmp_path / "e.jsonl", sample_rows(1, words=120)))[0]
    engine = PrefillEngine(lm, scorers=["streaming"])
    state = engine.prefill(sample)
    layers, n = lm.info.compressible_layers, lm.info.num_layers
    background = {layer: 24 for layer in layers}
    probes = [(layers[0], 16), (layers[-1], 40), (layers[-1], 24)]
    around = engine.window_metrics(state, probes, background=background)
    alone = engine.window_metrics(state, probes)
    for (layer, window), measured in zip(probes, around):
        windows = {**background, layer: window}
        plan = plan_of(lm.info, tuple("streaming" if i in windows else None for i in range(n)),
                       tuple(windows.get(i) for i in range(n)))
        assert measured["kl"] == pytest.approx(engine.run_windowed(state, [plan])[0].kl, abs=1e-4)
    assert around[0]["kl"] != pytest.approx(alone[0]["kl"], abs=1e-4)
