"""Per-head plans in the engine (LayerPlan.heads): each KV head keeps its own top-k, rows of different lengths
are padded and masked per head, and a per-head plan whose heads all agree is the per-layer plan."""

import pytest
import torch

from polykv_search.data import load_samples
from polykv_search.engine import PrefillEngine
from polykv_search.errors import ConfigError, PlanError
from polykv_search.plan import HeadPlan, LayerPlan, Plan
from tests.conftest import sample_rows, tiny_loaded, write_jsonl
from tests.plans import TEST, plan_of

POLICIES = ["snapkv", "knorm", "h2o_recent"]


@pytest.fixture(scope="module", params=["llama", "gemma"])
def setup(request, tmp_path_factory):
    lm = tiny_loaded(request.param)
    samples = load_samples(write_jsonl(tmp_path_factory.mktemp("h") / "s.jsonl", sample_rows(1, words=250)))
    engine = PrefillEngine(lm, scorers=POLICIES)
    return lm, engine, engine.prefill(samples[0])


def per_head(lm, choices) -> Plan:
    """choices(layer index, head) -> HeadPlan, for every compressible layer."""
    heads = lm.info.num_kv_heads
    return Plan.build(lm.info, search=TEST, layers=[LayerPlan(index=i, policy=None, heads=tuple(
        choices(i, h) for h in range(heads))) for i in lm.info.compressible_layers])


def test_heads_that_agree_are_the_per_layer_plan(setup):
    lm, engine, state = setup
    layers = lm.info.compressible_layers
    n = lm.info.num_layers
    per_layer = plan_of(lm.info, [POLICIES[i % 3] for i in range(n)], [10 + 3 * i for i in range(n)])
    same = per_head(lm, lambda i, h: HeadPlan.of(POLICIES[i % 3], 10 + 3 * i))
    (a, b) = engine.run_many(state, [per_layer, same])
    assert a.answer == b.answer and a.kl == pytest.approx(b.kl, abs=1e-6)
    for idx in layers:
        assert all(torch.equal(x, y) for x, y in zip(engine.kept_indices(state, per_layer)[idx],
                                                     engine.kept_indices(state, same)[idx]))


def test_each_head_keeps_its_own_top_k(setup):
    lm, engine, state = setup
    budgets = {0: 6, 1: 20}  # head 0 keeps 6 tokens, head 1 keeps 20, in every compressible layer
    plan = per_head(lm, lambda i, h: HeadPlan.of("knorm" if h == 0 else "snapkv", budgets[h]))
    kept = engine.kept_indices(state, plan)
    assert set(kept) == set(lm.info.compressible_layers)
    for idx, heads in kept.items():
        assert [len(k) for k in heads] == [6, 20]
        assert torch.equal(heads[0], state.rankings[idx]["knorm"][0].topk(6).indices)
        assert torch.equal(heads[1], state.rankings[idx]["snapkv"][1].topk(20).indices)


def test_a_ragged_row_batched_with_others_equals_it_alone(setup):
    """Padding a head to the batch's longest row and masking it per head changes nothing."""
    lm, engine, state = setup
    ragged = per_head(lm, lambda i, h: HeadPlan.of("snapkv", 5) if h == 0 else HeadPlan.full())
    others = [plan_of(lm.info, ["knorm"] * lm.info.num_layers, [30] * lm.info.num_layers), None]
    alone = engine.run(state, ragged)
    batched = engine.run_many(state, [ragged, *others])[0]
    assert batched.answer == alone.answer and batched.kl == pytest.approx(alone.kl, abs=1e-5)
    measured_alone = engine.answer_metrics_many(state, [ragged])[0]
    measured_batched = engine.answer_metrics_many(state, [*others, ragged], batch_size=3)[2]
    for key in ("kl", "nll", "miss"):
        assert measured_batched[key] == pytest.approx(measured_alone[key], abs=1e-5)
    full = engine.run(state, None)
    assert alone.kl > 1e-4 and abs(full.kl or 0.0) < 1e-6  # the per-head plan does change the output


def test_a_head_keeping_everything_is_not_compressed(setup):
    lm, engine, state = setup
    everything = per_head(lm, lambda i, h: HeadPlan.full() if h else HeadPlan.of("snapkv", 10_000))
    assert engine.kept_indices(state, everything) == {}  # budgets above the context keep it all
    assert engine.run(state, everything).kept_all_layers == lm.info.compressible_layers


def test_a_plan_naming_a_ranking_the_engine_did_not_score_is_refused(setup):
    lm, engine, state = setup
    plan = per_head(lm, lambda i, h: HeadPlan.of("tova", 8))
    with pytest.raises(ConfigError, match="did not score .tova..*for_plans"):
        engine.kept_indices(state, plan)
    head_count = per_head(lm, lambda i, h: HeadPlan.of("snapkv", 8))
    wrong = Plan.build(lm.info, search=TEST, layers=[LayerPlan(index=i, policy=None,
                                                               heads=head_count.layers[i].heads[:1])
                                                     for i in lm.info.compressible_layers])
    with pytest.raises(PlanError, match="1 head entries but the model has 2 KV heads"):
        engine.kept_indices(state, wrong)
