"""export --to duo-attention: the pattern folder loads into kvpress's DuoAttentionPress, and on a tiny Llama that
press keeps the tokens our runtime keeps for the same plan, with the same teacher-forced logits and greedy answer."""

import contextlib
import json

import pytest
import torch
from kvpress import DuoAttentionPress, KVPressTextGenerationPipeline
from transformers import DynamicCache

from polykv_search.data import load_samples
from polykv_search.engine import PrefillEngine
from polykv_search.errors import ExportError
from polykv_search.export import DuoPattern, duo_attention_pattern, export_plan
from polykv_search.export.duo_press import DuoAttentionPatternPress
from polykv_search.plan import HeadPlan, LayerPlan, Plan, PlanFile
from polykv_search.runtime import PlanPress, apply_plan, polykv_attention
from tests.conftest import sample_rows, tiny_loaded, write_jsonl
from tests.plans import TEST

WINDOW, FULL = 20, 1000  # StreamingLLM heads keep 4 sinks + 16 recent; FULL: above every context
T, S = 90, 8  # context and teacher-forced suffix tokens
IDS = torch.randint(3, 60, (1, T + S), generator=torch.Generator().manual_seed(5))
SHAPE = [(True, False), (False, True), (False, False)]  # per layer, per KV head: keeps everything?


def duo_plan(info) -> Plan:
    return Plan.build(info, search=TEST, layers=[
        LayerPlan(index=i, policy=None, heads=tuple(HeadPlan.of("streaming", FULL if full else WINDOW)
                                                    for full in SHAPE[i])) for i in info.compressible_layers])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    lm = tiny_loaded("llama")
    tmp = tmp_path_factory.mktemp("duo")
    plan_file = PlanFile.build(lm.info, [duo_plan(lm.info)])
    folder = export_plan(plan_file.save(tmp / "plan.json"), to="duo-attention", out=tmp / "pattern", context=FULL)
    samples = load_samples(write_jsonl(tmp / "s.jsonl", sample_rows(1, words=120)))
    return lm, plan_file.plans[0], folder, samples


def test_the_folder_holds_the_shared_window_and_the_full_heads(exported):
    lm, plan, folder, _ = exported
    config = json.loads((folder / "config.json").read_text())
    assert (config["sink_size"], config["recent_size"]) == (4, WINDOW - 4)
    assert config["head_compression_ratio"] == pytest.approx(4 / 6)
    assert (folder / "full_attention_heads.tsv").read_text() == "1\t0\n0\t1\n0\t0\n"
    model = PlanFile.load(folder.parent / "plan.json").model
    assert DuoPattern.read(folder) == duo_attention_pattern(plan, model=model, context=FULL)


def test_kvpress_reads_the_folder_as_it_reads_duo_attentions_repository(exported, monkeypatch):
    """kvpress's own loader (it fetches config.json and full_attention_heads.tsv by URL) served our files."""
    import kvpress.presses.duo_attention_press as duo

    lm, _, folder, _ = exported

    class Reply:
        def __init__(self, url: str):
            self.path = folder / url.rsplit("/", 1)[1]
            self.text = self.path.read_text()

        def json(self):
            return json.loads(self.text)

    monkeypatch.setattr(duo.requests, "get", lambda url, **kwargs: Reply(url))
    monkeypatch.setattr(lm.model.config, "name_or_path", next(iter(duo.PATTERNS_DICT)))
    duo.cache.clear()
    try:
        theirs = DuoAttentionPress(head_compression_ratio=DuoPattern.read(folder).head_compression_ratio)
        theirs.post_init_from_model(lm.model)
    finally:
        duo.cache.clear()
    ours = DuoAttentionPatternPress(pattern_dir=str(folder))
    ours.post_init_from_model(lm.model)
    expected = ~torch.tensor(SHAPE)
    assert torch.equal(theirs.streaming_mask.cpu(), expected) and torch.equal(ours.streaming_mask.cpu(), expected)
    assert (theirs.sink_size, theirs.recent_size) == (ours.sink_size, ours.recent_size) == (4, WINDOW - 4)


def test_duo_attention_keeps_our_tokens_and_gives_our_logits(exported):
    lm, plan, folder, _ = exported
    model = lm.model
    assert model.config._attn_implementation == "sdpa"  # kvpress's masking patches the model's own attention
    positions = torch.arange(T, T + S)[None]
    with torch.no_grad():
        cache = DynamicCache(config=model.config)
        with DuoAttentionPatternPress(pattern_dir=str(folder))(model):
            model(input_ids=IDS[:, :T], past_key_values=cache)
        masked = [layer.self_attn.masked_key_indices for layer in model.model.layers]
        theirs = model(input_ids=IDS[:, T:], past_key_values=cache, position_ids=positions).logits
        with apply_plan(model, plan) as press:
            cache = DynamicCache(config=model.config)
            model(input_ids=IDS[:, :T], past_key_values=cache)
            ours = model(input_ids=IDS[:, T:], past_key_values=cache, position_ids=positions).logits
    for layer, (batch, head, seq) in enumerate(masked):
        for h in range(lm.info.num_kv_heads):
            dropped = set(seq[(batch == 0) & (head == h)].tolist())
            kept = sorted(set(range(T)) - dropped)
            assert kept == sorted(press.kept_indices[layer][h].tolist()), (layer, h)
            assert len(kept) == (T if SHAPE[layer][h] else WINDOW)
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)


def greedy(model, context: list[int], question: list[int], press, *, outer=None, steps: int = 8) -> list[int]:
    """Prefill the context under `press`, then the question and the answer one token at a time (kvpress's masking
    searches fake keys for all queries of a forward at once, which 16-dim heads of many queries may not admit)."""
    cache = DynamicCache(config=model.config)
    tokens, position = [], len(context)

    def step(token: int) -> torch.Tensor:
        nonlocal position
        out = model(input_ids=torch.tensor([[token]]), past_key_values=cache, position_ids=torch.tensor([[position]]))
        position += 1
        return out.logits[0, -1]

    with torch.no_grad(), outer or contextlib.nullcontext():
        with press(model):
            model(input_ids=torch.tensor([context]), past_key_values=cache)
        for token in question[:-1]:
            step(token)
        token = question[-1]
        for _ in range(steps):
            token = int(step(token).argmax())
            tokens.append(token)
    return tokens


def test_duo_attention_answers_as_our_runtime(exported):
    lm, plan, folder, samples = exported
    state = PrefillEngine.for_plans(lm, [plan]).prefill(samples[0])
    context, question = list(state.parts.context_ids), list(state.parts.question_ids)
    assert len(context) > WINDOW  # the streaming heads do drop tokens
    theirs = greedy(lm.model, context, question, DuoAttentionPatternPress(pattern_dir=str(folder)))
    assert lm.model.config._attn_implementation == "sdpa"
    ours = greedy(lm.model, context, question, PlanPress(plan), outer=polykv_attention(lm.model))
    assert theirs == ours and len(ours) == 8
    assert lm.model.config._attn_implementation == "sdpa"


def test_plans_duo_attention_cannot_run_are_refused_naming_the_heads(exported):
    lm, _, _, _ = exported
    info = lm.info
    mixed = Plan.build(info, search=TEST, layers=[
        LayerPlan(index=0, policy=None, heads=(HeadPlan.of("snapkv", 20), HeadPlan.of("streaming", 20))),
        LayerPlan(index=1, policy=None, heads=(HeadPlan.of("streaming", 20), HeadPlan.of("streaming", 32))),
        LayerPlan.of(2, "streaming", 3)])
    model = PlanFile.build(info, [mixed]).model
    with pytest.raises(ExportError) as caught:
        duo_attention_pattern(mixed, model=model, context=FULL)
    message = str(caught.value)
    assert "\n" not in message
    assert "layer 0 (head 0) use snapkv, not streaming" in message
    assert "layer 1 (head 1) keep 32 tokens with 4 sinks, not the shared 20 with 4" in message
    assert "layer 2 (heads 0, 1) keep no more tokens than their sinks" in message
    with pytest.raises(ExportError, match="pass --context N"):  # heads at 1000 are full only below a context
        duo_attention_pattern(duo_plan(info), model=model)
