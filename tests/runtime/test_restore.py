"""What polykv-search borrows from a user's model it gives back: after the engine, calibrate's hooks, PlanPress
and apply_plan, no polykv_* attribute, hook, rotary attribute or layer list is left behind and the model's logits
equal the untouched model's bit for bit. PlanPress alone leaves the attention switched (kvpress's pipeline decodes
after the press exits); polykv_attention restores it."""

import pytest
import torch
from kvpress import KVPressTextGenerationPipeline
from transformers import DynamicCache

from polykv_search.calibration.capture import LayerCapture
from polykv_search.data import load_samples
from polykv_search.engine import PrefillEngine
from polykv_search.models.anatomy import decoder_layers
from polykv_search.runtime import ATTENTION_NAME, PlanPress, apply_plan, polykv_attention
from tests.conftest import kvpress_answer, sample_rows, tiny_loaded, write_jsonl
from tests.plans import plan_of

IDS = torch.randint(3, 60, (1, 90), generator=torch.Generator().manual_seed(1))
POLICIES = ["h2o", "expected_attention", "snapkv"]  # H2O observes the attention; ExpectedAttention reads rotary_emb


def fingerprint(model):
    """Everything a borrowing context could leave behind: attributes, hooks, children, layer lists, attention."""
    modules = {}
    for name, module in model.named_modules():
        modules[name] = (sorted(k for k in vars(module) if k.startswith("polykv")), sorted(dict(module.named_children())),
                         len(module._forward_hooks), len(module._forward_pre_hooks))
    configs = [c._attn_implementation for c in (model.config, model.config.get_text_config())]
    return modules, configs, id(decoder_layers(model)), len(model.state_dict())


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture(params=["llama", "gemma"])
def lm(request):
    return tiny_loaded(request.param, seed=3)


@pytest.fixture
def samples(tmp_path):
    return load_samples(write_jsonl(tmp_path / "s.jsonl", sample_rows(1, words=150)))


def plan_for(lm, budget=12):
    n = lm.info.num_layers
    return plan_of(lm.info, [POLICIES[i % len(POLICIES)] for i in range(n)], [budget + 4 * i for i in range(n)])


def assert_untouched(lm, before_fingerprint, before_logits):
    after = fingerprint(lm.model)
    assert not any(attrs for attrs, *_ in after[0].values()), "a polykv_* attribute was left on a module"
    assert after == before_fingerprint
    assert torch.equal(logits(lm.model), before_logits)  # bit for bit


def test_the_engine_leaves_the_model_as_it_was(lm, samples):
    before, expected = fingerprint(lm.model), logits(lm.model)
    engine = PrefillEngine(lm, scorers=POLICIES)
    state = engine.prefill(samples[0])
    plan = plan_for(lm)
    engine.run_many(state, [plan, None])
    engine.answer_metrics_many(state, [plan], reference=engine.full_plan())  # starts at later layers
    assert_untouched(lm, before, expected)


def test_calibrate_hooks_leave_the_model_as_they_found_it(lm):
    before, expected = fingerprint(lm.model), logits(lm.model)
    capture = LayerCapture(lm.model, lm.info, policies=POLICIES, budgets=[8, 16], window=16)
    with capture.attached(), torch.no_grad():
        capture.start_sample(IDS.shape[1])
        capture.phase = "prefill"
        lm.model(input_ids=IDS, past_key_values=DynamicCache(config=lm.model.config), use_cache=True)
        assert capture.rankings()  # the hooks ran
    assert_untouched(lm, before, expected)


def test_apply_plan_restores_everything_it_changes(lm):
    before, expected = fingerprint(lm.model), logits(lm.model)
    with apply_plan(lm.model, plan_for(lm)):
        lm.model.generate(IDS, max_new_tokens=4, do_sample=False)
        assert lm.model.config._attn_implementation == ATTENTION_NAME  # switched inside
    assert_untouched(lm, before, expected)


def test_plan_press_keeps_only_the_attention_switched_and_polykv_attention_restores_it(lm, samples):
    before, expected = fingerprint(lm.model), logits(lm.model)
    press = PlanPress(plan_for(lm))
    cache = DynamicCache(config=lm.model.config)
    with torch.no_grad(), press(lm.model):
        lm.model(input_ids=IDS, past_key_values=cache, use_cache=True)
    modules, configs, layers, state_size = fingerprint(lm.model)
    assert configs == [ATTENTION_NAME] * 2  # left for kvpress's pipeline, which decodes after the press exits
    assert (modules, layers, state_size) == (before[0], before[2], before[3])  # nothing else left behind
    assert torch.equal(logits(lm.model), expected)  # on an untouched cache the switched attention is SDPA exactly
    with polykv_attention(lm.model):
        pass
    assert fingerprint(lm.model)[1] == [ATTENTION_NAME] * 2  # it restores what it found: still switched
    lm.model.config._attn_implementation = "sdpa"
    lm.model.config.get_text_config()._attn_implementation = "sdpa"
    # the documented way: wrap the pipeline call; afterwards the model is as it was
    pipe = KVPressTextGenerationPipeline(model=lm.model, tokenizer=lm.tokenizer)
    state = PrefillEngine(lm, scorers=POLICIES).prefill(samples[0])
    kvpress_answer(pipe, state, press)  # with polykv_attention(model): pipe.forward(..., press=press)
    assert_untouched(lm, before, expected)
