"""Every model family kvpress supports, on a tiny random model of each (Llama, Mistral, Phi-3 with its fused qkv_proj,
Qwen2, Qwen3 with its q/k norms, Gemma-3 with its sliding-window layers): the architecture-sensitive checks."""

from contextlib import contextmanager

import pytest
import torch
from kvpress import KVPressTextGenerationPipeline
from transformers import DynamicCache

from polykv_search.calibration.capture import LayerCapture
from polykv_search.data import load_samples
from polykv_search.engine import PrefillEngine
from polykv_search.models.anatomy import layer_rotaries
from polykv_search.plan import HeadPlan, LayerPlan, Plan
from polykv_search.policies import POLICIES
from polykv_search.policies.presses import make_press, seeded_rng
from polykv_search.runtime import PlanPress, apply_plan, polykv_attention
from tests.conftest import FAMILIES, kvpress_answer, sample_rows, tiny_loaded, write_jsonl
from tests.plans import TEST, plan_of

T = 120
IDS = torch.randint(3, 60, (1, T), generator=torch.Generator().manual_seed(3))
SCORERS = [name for name in ("snapkv", "tova", "knorm", "expected_attention", "keydiff") if name in POLICIES]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    lm = tiny_loaded(request.param, seed=2)
    samples = load_samples(write_jsonl(tmp_path_factory.mktemp(request.param) / "s.jsonl",
                                       sample_rows(1, words=200)))
    return lm, samples


def mixed_plan(lm) -> Plan:
    """Not KNorm: on models that normalize their keys (Qwen3, Gemma-3) every key has about the same norm, so its
    ranking is decided by rounding, which differs between two prefills computed along different (exact) paths."""
    n = lm.info.num_layers
    return plan_of(lm.info, [("snapkv", "h2o_recent", "expected_attention", "tova")[i % 4] for i in range(n)],
                   [14 + 9 * i for i in range(n)])


def per_head_plan(lm) -> Plan:
    heads = lm.info.num_kv_heads
    return Plan.build(lm.info, search=TEST, layers=[LayerPlan(index=i, policy=None, heads=tuple(
        HeadPlan.of(("snapkv", "tova")[h % 2], 6 + 30 * h) for h in range(heads))) for i in lm.info.compressible_layers])


def assert_engine_equals_pipeline(lm, plans, samples):
    """Each plan's answer and kept tokens per layer and KV head from the engine equal PlanPress's in kvpress's
    pipeline, on every sample."""
    pipe = KVPressTextGenerationPipeline(model=lm.model, tokenizer=lm.tokenizer)
    for plan in plans:
        engine = PrefillEngine.for_plans(lm, [plan])
        for sample in samples:
            state = engine.prefill(sample)
            press = PlanPress(plan)
            assert engine.run(state, plan).answer == kvpress_answer(pipe, state, press)
            for layer, kept in engine.kept_indices(state, plan).items():
                theirs = press.kept_indices[layer]
                theirs = [theirs[0, h] for h in range(theirs.shape[1])] if torch.is_tensor(theirs) else theirs
                assert all(torch.equal(a, b) for a, b in zip(kept, theirs)), layer


def test_the_engine_equals_kvpress_pipeline_with_plan_press(family):
    lm, samples = family
    assert_engine_equals_pipeline(lm, (mixed_plan(lm), per_head_plan(lm)), samples)


def test_polykv_attention_is_sdpa_on_uncompressed_caches(family):
    lm, _ = family
    with torch.no_grad():
        plain = lm.model(input_ids=IDS).logits
        with polykv_attention(lm.model):
            switched = lm.model(input_ids=IDS).logits
            cache = DynamicCache(config=lm.model.config)
            lm.model(input_ids=IDS[:, :100], past_key_values=cache)
            stepwise = lm.model(input_ids=IDS[:, 100:], past_key_values=cache,
                                position_ids=torch.arange(100, T)[None]).logits
    assert torch.equal(switched, plain)
    torch.testing.assert_close(stepwise, plain[:, 100:], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", ["per_layer", "per_head"])
def test_generate_equals_a_manual_decode_loop(family, kind):
    lm, _ = family
    plan = mixed_plan(lm) if kind == "per_layer" else per_head_plan(lm)
    with apply_plan(lm.model, plan):
        generated = lm.model.generate(IDS, max_new_tokens=6, do_sample=False)[0, T:].tolist()
    cache = DynamicCache(config=lm.model.config)
    tokens = []
    with torch.no_grad(), polykv_attention(lm.model):
        with PlanPress(plan)(lm.model):
            out = lm.model(input_ids=IDS, past_key_values=cache)
        for step in range(6):
            tokens.append(int(out.logits[0, -1].argmax()))
            out = lm.model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache,
                           position_ids=torch.tensor([[T + step]]))
    assert generated and generated == tokens[:len(generated)]


def test_calibrate_scores_equal_each_press_score(family):
    """The rankings calibrate records are each kvpress press's own `score()` on the same prefill."""
    lm, _ = family
    recorded = {}

    def record(module, args, kwargs, output):  # what kvpress's hooks see after each layer's prefill
        layer = kwargs["past_key_values"].layers[module.layer_idx]
        recorded[module.layer_idx] = (module, kwargs["hidden_states"], layer.keys, layer.values, kwargs)

    capture = LayerCapture(lm.model, lm.info, policies=SCORERS, budgets=[16], window=16)
    layers = lm.model.model.layers
    with capture.attached(), torch.no_grad():
        handles = [layers[idx].self_attn.register_forward_hook(record, with_kwargs=True)
                   for idx in lm.info.compressible_layers]
        try:
            capture.start_sample(T)
            capture.phase = "prefill"
            lm.model(input_ids=IDS, past_key_values=DynamicCache(config=lm.model.config), use_cache=True)
            ours = capture.rankings()
            for idx, (module, hidden, keys, values, kwargs) in recorded.items():
                for name in SCORERS:
                    press = make_press(name)
                    press.post_init_from_model(lm.model)
                    theirs = press.score(module, hidden, keys, values, None, kwargs)[0].float()  # (H_kv, T)
                    torch.testing.assert_close(ours[idx][name], theirs, atol=1e-5, rtol=1e-4, msg=f"{name} {idx}")
        finally:
            for handle in handles:
                handle.remove()


def test_a_family_polykv_does_not_run_is_refused_in_one_line(monkeypatch, capsys, tmp_path):
    from transformers import GPT2Config

    from tests.cli.test_calibrate_cli import run_cli

    GPT2Config(n_layer=2, n_embd=32, n_head=2).save_pretrained(tmp_path / "gpt2")  # a config is all it reads
    data = write_jsonl(tmp_path / "d.jsonl", sample_rows(1))
    code, _, err = run_cli(monkeypatch, capsys, "calibrate", "--model", tmp_path / "gpt2", "--data", data, "--out",
                           tmp_path / "out")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert "'gpt2', a family polykv-search does not run" in lines[0] and "Qwen3" in lines[0] and "Phi-3" in lines[0]
    assert not (tmp_path / "out").exists()


# The kvpress scorers registered for #36. LONG passes LagKV's 4 sinks + three 128-token partitions (the first two
# scored, so their ranks tie across partitions) and spans two of Compactor's and NonCausalAttn's 256-token chunks.
NEW_SCORERS = [name for name in ("lagkv", "curdkv", "leverage", "noncausal_attention", "compactor", "capkv",
                                  "critical_snapkv", "critical_expected_attention") if name in POLICIES]
LONG = 420
LONG_IDS = torch.randint(3, 60, (1, LONG), generator=torch.Generator().manual_seed(4))


def _seeding_attention(lm, seed: int) -> list:
    """Pre-hooks seeding torch's RNG before each layer's attention, as our ranking seeds a press that draws from it
    (nothing between the pre-hook and kvpress's own hook draws: eval mode, no dropout)."""
    def seed_layer(module, args) -> None:
        torch.manual_seed(seed + module.layer_idx)

    return [layer.self_attn.register_forward_pre_hook(seed_layer) for layer in lm.model.model.layers]


@contextmanager
def kvpress_hooks(lm, press):
    """kvpress's own context manager; on Gemma-3 its press's own `forward_hook` on the full-attention layers only,
    with each layer's rotary, as kvpress does for the multimodal Gemma-3 (on Gemma3ForCausalLM its context manager
    hooks the sliding-window layers too, whose cache is shorter than the prompt, which the prefill-only scorers
    refuse, and gives CapPress a rotary without a layer type)."""
    layers = lm.model.model.layers
    if len(lm.info.compressible_layers) == len(layers):
        with press(lm.model):
            yield
        return
    press.post_init_from_model(lm.model)
    handles = [layers[idx].self_attn.register_forward_hook(press.forward_hook, with_kwargs=True)
               for idx in lm.info.compressible_layers]
    try:
        with layer_rotaries(lm.model, lm.info.compressible_layers):
            yield
    finally:
        for handle in handles:
            handle.remove()


def kvpress_kept(lm, name: str, n_kept: int) -> dict[int, list[set[int]]]:
    """Per compressible layer and KV head, the context tokens kvpress's own press keeps when it compresses the
    prefill to n_kept tokens (found by matching the compressed cache's keys to the full cache's)."""
    press = make_press(name, compression_ratio=1 - (n_kept + 0.5) / LONG)  # kvpress keeps int(T * (1 - r))
    full, compressed = DynamicCache(config=lm.model.config), DynamicCache(config=lm.model.config)
    seed = POLICIES[name].seed
    handles = _seeding_attention(lm, seed) if seed is not None else []
    try:
        with torch.no_grad():
            lm.model(input_ids=LONG_IDS, past_key_values=full, use_cache=True)
            with kvpress_hooks(lm, press):
                lm.model(input_ids=LONG_IDS, past_key_values=compressed, use_cache=True)
    finally:
        for handle in handles:
            handle.remove()
    kept = {}
    for idx in lm.info.compressible_layers:
        before, after = full.layers[idx].keys[0], compressed.layers[idx].keys[0]  # (H_kv, T, D), (H_kv, n, D)
        match = (after[:, :, None, :] == before[:, None, :, :]).all(-1)  # (H_kv, n, T)
        kept[idx] = [set(match[h].float().argmax(-1).tolist()) for h in range(match.shape[0])]
    return kept


def raw_scores(lm, name: str) -> dict[int, torch.Tensor]:
    """kvpress's own `score()` per compressible layer, (H_kv, T), to tell its ties (seeded as the ranking is)."""
    recorded = {}

    def record(module, args, kwargs, output):
        layer = kwargs["past_key_values"].layers[module.layer_idx]
        recorded[module.layer_idx] = (module, kwargs["hidden_states"], layer.keys, layer.values, kwargs)

    layers = lm.model.model.layers
    press = make_press(name)
    press.post_init_from_model(lm.model)
    handles = [layers[idx].self_attn.register_forward_hook(record, with_kwargs=True)
               for idx in lm.info.compressible_layers]
    try:
        with torch.no_grad(), layer_rotaries(lm.model, lm.info.compressible_layers):
            lm.model(input_ids=LONG_IDS, past_key_values=DynamicCache(config=lm.model.config), use_cache=True)
            scores = {}
            for idx, (module, hidden, keys, values, kwargs) in recorded.items():
                seed = POLICIES[name].seed
                with seeded_rng(seed + idx, keys.device) if seed is not None else torch.no_grad():
                    scores[idx] = press.score(module, hidden, keys, values, None, kwargs)[0].float()
    finally:
        for handle in handles:
            handle.remove()
    return scores


@pytest.mark.parametrize("name", NEW_SCORERS)
def test_new_scorers_keep_what_their_kvpress_press_keeps(family, name):
    """At every budget, each KV head's top-b of the ranking is the set kvpress's press keeps; where kvpress's scores
    tie at the boundary (LagKV's partitions), it keeps some of the tied tokens and the ranking the newest of them."""
    lm, _ = family
    capture = LayerCapture(lm.model, lm.info, policies=[name], budgets=[16], window=16)
    with capture.attached(), torch.no_grad():
        capture.start_sample(LONG)
        capture.phase = "prefill"
        lm.model(input_ids=LONG_IDS, past_key_values=DynamicCache(config=lm.model.config), use_cache=True)
        rankings = {idx: ranks[name] for idx, ranks in capture.rankings().items()}
    raw = raw_scores(lm, name)
    exact = POLICIES[name].ranking != "score_ties_newest"
    for n_kept in (300, 180, 100, 16):
        if name == "critical_snapkv" and n_kept < 128:  # its first stage takes n/2 of SnapKV's 64 tied window tokens:
            continue  # which ones is kvpress's top-k's choice
        theirs = kvpress_kept(lm, name, n_kept)
        for idx, ranking in rankings.items():
            for head in range(ranking.shape[0]):
                ours = set(ranking[head].topk(n_kept).indices.tolist())
                if exact:
                    assert ours == theirs[idx][head], (name, n_kept, idx, head)
                    continue
                scores = raw[idx][head]
                boundary = scores.topk(n_kept).values[-1]
                above = set((scores > boundary).nonzero().flatten().tolist())
                tied = sorted((scores == boundary).nonzero().flatten().tolist())
                assert above <= theirs[idx][head] <= above | set(tied), (name, n_kept, idx, head)
                assert ours == above | set(tied[len(tied) - (n_kept - len(above)):]), (name, n_kept, idx, head)


def test_the_engine_equals_kvpress_pipeline_with_plan_press_on_the_new_scorers(family):
    """A plan of the #36 scorers, per layer and per KV head: the engine's kept tokens and answer are PlanPress's in
    kvpress's pipeline (the seeded presses rank alike in both)."""
    lm, samples = family
    n, heads = lm.info.num_layers, lm.info.num_kv_heads
    per_layer = plan_of(lm.info, [NEW_SCORERS[i % len(NEW_SCORERS)] for i in range(n)], [14 + 9 * i for i in range(n)])
    per_head = Plan.build(lm.info, search=TEST, layers=[LayerPlan(index=i, policy=None, heads=tuple(
        HeadPlan.of(NEW_SCORERS[(i + h) % len(NEW_SCORERS)], 6 + 30 * h) for h in range(heads)))
        for i in lm.info.compressible_layers])
    assert_engine_equals_pipeline(lm, (per_layer, per_head), samples[:1])
