"""A per-head plan written as a schema-2 file goes through `evaluate` beside Ada-KV, with the memory of every method
stated as KV entries and as bytes; its answers there are the answers of PlanPress in kvpress's pipeline."""

import pytest
import torch
from kvpress import KVPressTextGenerationPipeline

import polykv_search as pk
from polykv_search.engine import PrefillEngine
from polykv_search.plan import HeadPlan, LayerPlan, Plan, PlanFile, load_plan
from polykv_search.runtime import PlanPress
from tests.conftest import kvpress_answer, sample_rows, tiny_loaded, write_jsonl
from tests.plans import TEST

BUDGET = 16


def per_head_file(lm, path) -> PlanFile:
    """KV head 0 keeps 4 tokens and head 1 keeps 28 in every layer: 16 on average, as a uniform plan at 16."""
    layers = [LayerPlan(index=i, policy=None, heads=(HeadPlan.of("knorm", 4), HeadPlan.of("snapkv", 28)))
              for i in lm.info.compressible_layers]
    PlanFile.build(lm.info, [Plan.build(lm.info, average_budget=BUDGET, layers=layers, search=TEST)]).save(path)
    return load_plan(path, model=lm.info)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ph")
    lm = tiny_loaded("llama", seed=6)
    data = write_jsonl(tmp / "e.jsonl", sample_rows(2, words=160, seed=2))
    plan_file = per_head_file(lm, tmp / "heads.json")
    report = pk.evaluate(lm, data, plans={"heads": plan_file}, policies=["snapkv", "knorm"], out_dir=tmp / "ev")
    return lm, data, plan_file, report


def test_the_file_is_version_2_and_the_report_compares_it_with_adakv(evaluated):
    _, _, plan_file, report = evaluated
    assert plan_file.schema_version == "2.0.0" and plan_file.plans[0].per_head
    assert {r.method for r in report.recovery} == {"heads", "pyramidkv", "adakv"}
    assert "| adakv | 16 |" in report.markdown()


def test_memory_is_stated_as_entries_and_as_bytes(evaluated):
    lm, _, _, report = evaluated
    rows = report.methods
    for key in ("heads@16", "adakv@16", "snapkv@16", "pyramidkv@16"):
        assert rows[key].kv_entries == pytest.approx(BUDGET), key  # the same KV entries at the same budget
    per_entry = 2 * lm.info.head_dim * 4  # float32 key and value
    slots = len(lm.info.compressible_layers) * lm.info.num_kv_heads
    assert rows["heads@16"].kv_mb == pytest.approx(BUDGET * slots * per_entry / 1e6)  # ragged: nothing padded
    full = rows["full"]
    assert full.kv_entries > 100 and full.kv_mb == pytest.approx(full.kv_entries * slots * per_entry / 1e6)


def test_its_answers_are_planpress_answers_in_kvpress_pipeline(evaluated):
    lm, data, plan_file, report = evaluated
    plan = plan_file.plans[0]
    engine = PrefillEngine.for_plans(lm, [plan])
    pipe = KVPressTextGenerationPipeline(model=lm.model, tokenizer=lm.tokenizer)
    answers = {r.sample_id: r.answer for r in report.results if r.method == "heads@16"}
    for sample in pk.load_samples(data):
        state = engine.prefill(sample)
        assert kvpress_answer(pipe, state, PlanPress(plan)) == answers[str(sample.id)]
    with torch.no_grad():
        assert lm.model.config._attn_implementation == "sdpa"  # the helper gave the attention back
