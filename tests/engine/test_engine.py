"""The shared-prefill engine is exact: kept indices and greedy answers equal kvpress's pipeline with PlanPress."""

import math

import pytest
import torch
from kvpress import KVPressTextGenerationPipeline

from polykv_search.data import load_samples
from polykv_search.engine import PrefillEngine
from polykv_search.plan import HeadPlan, LayerPlan, Plan
from polykv_search.policies import DEFAULT_POLICIES, policy_params
from polykv_search.runtime import PlanPress
from tests.conftest import kvpress_answer, sample_rows, tiny_loaded, write_jsonl
from tests.plans import TEST, plan_of

LLAMA = tiny_loaded("llama").info
METHODS = [
    plan_of(LLAMA, ("snapkv", "h2o", "expected_attention"), (16, 40, 60)),
    plan_of(LLAMA, ("streaming", "keydiff", "tova"), (50, 10, 10_000)),  # last: more than T
    plan_of(LLAMA, ("knorm",) * 3, (32, 32, 32)),
    plan_of(LLAMA, ("random",) * 3, (32, 32, 32)),
    plan_of(LLAMA, ("h2o_recent", "keydiff_recent", "expected_attention_recent"), (20, 30, 46)),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    lm = tiny_loaded("llama")
    path = write_jsonl(tmp_path_factory.mktemp("d") / "e.jsonl", sample_rows(2, words=300))
    return lm, load_samples(path)


def test_engine_equals_kvpress_pipeline_with_plan_press(setup):
    lm, samples = setup
    engine = PrefillEngine(lm, scorers=DEFAULT_POLICIES)
    pipe = KVPressTextGenerationPipeline(model=lm.model, tokenizer=lm.tokenizer)
    for sample in samples:
        state = engine.prefill(sample)
        for number, method in enumerate(METHODS):
            result = engine.run(state, method)
            press = PlanPress(method)
            answer = kvpress_answer(pipe, state, press)
            ours = engine.kept_indices(state, method)
            assert set(ours) == set(press.kept_indices)
            for layer, indices in ours.items():
                assert torch.equal(torch.stack(indices), press.kept_indices[layer][0]), (number, layer)
            assert result.answer == answer, number
            assert result.kl is not None and result.kl >= -1e-6
    assert engine.prefills == len(samples)  # one prefill per sample, whatever the number of methods


def test_full_method_has_zero_kl_and_budget_over_length_is_reported(setup):
    lm, samples = setup
    engine = PrefillEngine(lm, scorers=["snapkv", "tova"])
    state = engine.prefill(samples[0])
    full = engine.run(state, engine.full_plan())
    assert abs(full.kl) < 1e-5
    result = engine.run(state, plan_of(lm.info, ("tova",) * 3, (9999,) * 3))
    assert result.kept_all_layers == [0, 1, 2]
    assert result.answer == full.answer


def test_batched_methods_give_the_same_answers_as_one_by_one(setup):
    lm, samples = setup
    engine = PrefillEngine(lm, scorers=DEFAULT_POLICIES)
    state = engine.prefill(samples[1])
    single = [engine.run(state, m) for m in METHODS]
    batched = engine.run_many(state, METHODS, batch_size=3)  # two batches, the second of one row
    assert [r.answer for r in batched] == [r.answer for r in single]
    for one, many in zip(single, batched):
        assert many.kl == pytest.approx(one.kl, abs=1e-4)
        assert many.kept_all_layers == one.kept_all_layers


def test_gemma_sliding_layers_batched_and_single_agree(setup):
    _, samples = setup
    lm = tiny_loaded("gemma")
    engine = PrefillEngine(lm, scorers=["snapkv", "knorm"])
    state = engine.prefill(samples[0])
    methods = [plan_of(lm.info, (None, "snapkv", None, "knorm"), (None, 16, None, 32)),
               plan_of(lm.info, (None, "knorm", None, "knorm"), (None, 24, None, 24))]
    single = [engine.run(state, m) for m in methods]
    batched = engine.run_many(state, methods)
    assert [r.answer for r in batched] == [r.answer for r in single]
    assert set(engine.kept_indices(state, methods[0])) == {1, 3}  # sliding layers are never compressed


def test_answer_metrics_match_a_direct_computation(setup):
    lm, samples = setup
    engine = PrefillEngine(lm, scorers=["snapkv", "h2o_recent"])
    state = engine.prefill(samples[0])
    methods = [engine.full_plan(), plan_of(lm.info, ("snapkv", "h2o_recent", "snapkv"), (16, 40, 60))]
    metrics = engine.answer_metrics_many(state, methods)
    answer = torch.tensor(state.parts.answer_ids)
    full = state.full_logprobs  # (A, V)
    assert metrics[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert metrics[0]["nll"] == pytest.approx(-full.gather(-1, answer[:, None]).mean().item(), abs=1e-4)
    assert metrics[0]["miss"] == pytest.approx((full.argmax(-1) != answer).float().mean().item())
    single = engine.answer_logprobs(state, methods[1])  # (A, V), one row
    assert metrics[1]["nll"] == pytest.approx(-single.gather(-1, answer[:, None]).mean().item(), abs=1e-4)
    assert metrics[1]["kl"] == pytest.approx(engine.kl_many(state, methods[1:])[0], abs=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_answer_metrics_starting_at_the_first_compressed_layer_equal_a_forward_from_the_embeddings(setup, arch):
    _, samples = setup
    lm = tiny_loaded(arch)
    engine = PrefillEngine(lm, scorers=["snapkv", "knorm"])
    state = engine.prefill(samples[0])
    n, last = lm.info.num_layers, lm.info.compressible_layers[-1]
    one_layer = [None] * n
    one_layer[last] = "snapkv"
    sizes = [None] * n
    sizes[last] = 8
    mixed = [p if i in lm.info.compressible_layers else None for i, p in enumerate(["knorm", "snapkv"] * n)][:n]
    methods = [plan_of(lm.info, one_layer, sizes),  # starts at the last layer
               plan_of(lm.info, mixed, [16 if p else None for p in mixed]),  # starts at 0/1
               plan_of(lm.info, one_layer, [12 if s else None for s in sizes])]
    assert state.suffix_inputs is not None and len(state.suffix_inputs) == n
    skipped = engine.answer_metrics_many(state, methods, batch_size=2)  # batches {late, late2} and {all}
    state.suffix_inputs = None  # every row from the embeddings, in the given order
    full_run = engine.answer_metrics_many(state, methods, batch_size=2)
    for a, b in zip(skipped, full_run):
        for key in ("kl", "nll", "miss", "lost"):
            assert a[key] == pytest.approx(b[key], abs=1e-5)
    assert skipped[0]["kl"] != pytest.approx(skipped[1]["kl"], abs=1e-4)  # results stay in the methods' order


def test_decoding_stops_per_row_once_the_scored_part_is_complete(setup, monkeypatch):
    """A row stops when its task's metric has read everything it will read (here: three words); other rows of the
    batch go on, and each answer is the start of the one decoded without stopping."""
    lm, samples = setup
    engine = PrefillEngine(lm, scorers=DEFAULT_POLICIES)
    state = engine.prefill(samples[0])
    unstopped = [engine.run(state, m).answer for m in METHODS]
    import polykv_search.engine.engine as engine_module

    monkeypatch.setattr(engine_module, "scored_part_complete", lambda task, text: len(text.split()) >= 3)
    single = [engine.run(state, m).answer for m in METHODS]
    batched = [r.answer for r in engine.run_many(state, METHODS, batch_size=4)]
    assert batched == single
    for short, full in zip(single, unstopped):
        assert full.startswith(short)
        assert len(short.split()) == min(3, len(full.split()))  # stopped exactly when complete, not later
    assert any(len(full.split()) > 3 for full in unstopped)  # the stop did cut something


def test_lost_is_the_share_of_the_output_distribution_lost(setup):
    lm, samples = setup
    engine = PrefillEngine(lm, scorers=("snapkv",))
    state = engine.prefill(samples[0])
    plan = plan_of(lm.info, ["snapkv"] * lm.info.num_layers, [8] * lm.info.num_layers)
    full, measured = engine.answer_metrics_many(state, [engine.full_plan(), plan])
    assert full["lost"] == pytest.approx(0.0, abs=1e-6)
    assert measured["kl"] > 0 and measured["lost"] == pytest.approx(1 - math.exp(-measured["kl"]), rel=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_rows_starting_where_they_leave_a_reference_equal_a_forward_from_the_embeddings(setup, arch):
    """calibrate --around's probes: every row is a background with one layer changed; with the background as
    `reference` each row's forward starts at its changed layer from the background's hidden states."""
    _, samples = setup
    lm = tiny_loaded(arch)
    engine = PrefillEngine(lm, scorers=["snapkv", "knorm"])
    state = engine.prefill(samples[0])
    n, layers = lm.info.num_layers, lm.info.compressible_layers
    names = tuple("snapkv" if i in layers else None for i in range(n))
    sizes = tuple(12 if i in layers else None for i in range(n))
    reference = plan_of(lm.info, names, sizes)
    rows = [reference]
    for layer in layers:
        for policy, budget in (("knorm", 12), ("snapkv", 8), ("snapkv", 10_000)):
            changed_names, changed_sizes = list(names), list(sizes)
            changed_names[layer], changed_sizes[layer] = policy, budget
            rows.append(plan_of(lm.info, changed_names, changed_sizes))
    assert [engine.first_changed_layer(state, m, reference) for m in rows] == [n] + [i for i in layers for _ in range(3)]
    inputs = engine.layer_inputs(state, reference)
    assert inputs is not None and len(inputs) == n
    skipped = engine.answer_metrics_many(state, rows, batch_size=3, reference=reference)
    state.suffix_inputs = None  # every row from the embeddings
    full_run = engine.answer_metrics_many(state, rows, batch_size=3)
    for a, b in zip(skipped, full_run):
        for key in ("kl", "nll", "miss", "lost"):
            assert a[key] == pytest.approx(b[key], abs=1e-5)
    assert len({round(m["kl"], 4) for m in skipped}) > 2  # the rows measure different caches
