"""Plans by prompt length end to end on a tiny model: `run` with a calibration split per length writes a rung per
split; evaluate, PlanPress and apply_plan answer each prompt with the rung of its length; export asks which."""

from __future__ import annotations

import pytest
import torch

import polykv_search as pk
from polykv_search.errors import PlanError
from polykv_search.export import export_plan
from polykv_search.optimization.lengths import by_length, length_ranges
from polykv_search.plan import PlanFile
from polykv_search.runtime import PlanPress, apply_plan
from tests.conftest import sample_rows, write_jsonl
from tests.plans import uniform_of

GRID = (8, 16, 32)


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lengths")
    short = write_jsonl(tmp / "short.jsonl", sample_rows(2, words=120, seed=1))
    long = write_jsonl(tmp / "long.jsonl", sample_rows(2, words=480, seed=2))
    held_out = write_jsonl(tmp / "held.jsonl", sample_rows(1, words=120, seed=3) +
                           [dict(r, _id=f"l{i}") for i, r in enumerate(sample_rows(1, words=480, seed=4))])
    return short, long, held_out, tmp


@pytest.fixture(scope="module")
def two_rungs(tiny_llama):
    """At 16 tokens: SnapKV for prompts around the short split's length, StreamingLLM for the long one's."""
    ranges = length_ranges([(100, 200), (400, 700)])
    return by_length([PlanFile.build(tiny_llama.info, [uniform_of(tiny_llama.info, policy, 16)])
                      for policy in ("snapkv", "streaming")], ranges)


def test_run_with_a_split_per_length_writes_a_rung_per_split(tiny_llama, splits):
    short, long, held_out, tmp = splits
    result = pk.run(tiny_llama, budgets=16, calib_splits=[long, short], eval_data=held_out,
                    policies=["snapkv", "streaming"], grid=GRID, compare=["streaming"], allocators=[],
                    config=pk.OptimizeConfig(cost="out_err"), out_dir=tmp / "run")
    first, second = result.by_length  # shortest first, whatever the order given
    lengths = [tuple(int(x) for x in (p.calibration.profile.arrays["context_tokens"].min(),
                                      p.calibration.profile.arrays["context_tokens"].max())) for p in (first, second)]
    assert lengths[0][1] < lengths[1][0]
    assert first.context.calibrated == lengths[0] and second.context.calibrated == lengths[1]
    assert second.calibration.path.parent == tmp / "run"  # the first split given keeps the run folder's layout
    assert first.calibration.path.parent == tmp / "run" / "calib-short"
    assert first.guard and second.guard and first.guard_samples == second.guard_samples == 2
    written = pk.load_plan(result.plan_path)
    assert written.by_length and written.budgets == [16] and written.schema_version == "2.1.0"
    rungs = written.rungs_for(16)
    assert [r.context for r in rungs] == [first.context, second.context]
    assert rungs[0].context.max_tokens + 1 == rungs[1].context.min_tokens
    assert {b.label for b in result.report.by_length} == {f"0-{rungs[0].context.max_tokens}",
                                                          f"{rungs[1].context.min_tokens}+"}


def test_run_with_one_split_records_its_lengths(tiny_llama, splits):
    short, _, held_out, tmp = splits
    result = pk.run(tiny_llama, budgets=16, calib=short, eval_data=held_out, policies=["snapkv", "streaming"],
                    grid=GRID, compare=["streaming"], allocators=[], config=pk.OptimizeConfig(cost="out_err"),
                    guard=False, out_dir=tmp / "one")
    [rung] = result.plan_file.plans
    assert rung.context.min_tokens == 0 and rung.context.max_tokens is None and rung.context.calibrated


def test_evaluate_answers_each_sample_with_the_rung_of_its_length(tiny_llama, splits, two_rungs):
    _, _, held_out, tmp = splits
    report = pk.evaluate(tiny_llama, held_out, plans={"byl": two_rungs}, policies=["snapkv", "streaming"],
                         allocators=[], out_dir=tmp / "ev")
    rows = {(r.method, r.sample_id): r for r in report.results}
    short_id, long_id = "s0", "l0"
    assert rows[("byl@16", short_id)].context_tokens < rows[("byl@16", long_id)].context_tokens
    for sample, twin in ((short_id, "snapkv@16"), (long_id, "streaming@16")):
        assert rows[("byl@16", sample)].answer == rows[(twin, sample)].answer
        assert rows[("byl@16", sample)].kl == rows[(twin, sample)].kl
    assert len(report.by_length) == 2 and all(b.samples == 1 for b in report.by_length)


def test_plan_press_and_apply_plan_pick_the_rung_by_prompt_length(tiny_llama, two_rungs):
    model = tiny_llama.model
    for length, policy in ((150, "snapkv"), (500, "streaming")):
        ids = torch.randint(3, 60, (1, length), generator=torch.Generator().manual_seed(length))
        alone = PlanPress(uniform_of(tiny_llama.info, policy, 16))
        with apply_plan(model, alone):
            expected = model.generate(ids, max_new_tokens=4, do_sample=False)
        with apply_plan(model, two_rungs, budget=16) as press:
            got = model.generate(ids, max_new_tokens=4, do_sample=False)
        assert press.plan.layers[0].policy == policy
        assert torch.equal(got, expected)
        assert all(torch.equal(press.kept_indices[i], alone.kept_indices[i]) for i in alone.kept_indices)


def test_a_prompt_far_beyond_the_calibration_is_said_once(tiny_llama, two_rungs, caplog):
    press = PlanPress(two_rungs.plans[1], rungs=tuple(two_rungs.rungs_for(16)))
    ids = torch.randint(3, 60, (1, 1000), generator=torch.Generator().manual_seed(0))
    with caplog.at_level("WARNING"), apply_plan(tiny_llama.model, press):
        tiny_llama.model.generate(ids, max_new_tokens=2, do_sample=False)
        tiny_llama.model.generate(ids, max_new_tokens=2, do_sample=False)
    said = [r.getMessage() for r in caplog.records if "far longer" in r.getMessage()]
    assert len(said) == 1 and "1000 context tokens" in said[0] and "400-700" in said[0]


def test_a_strict_plan_refuses_a_longer_prompt(tiny_llama):
    strict = by_length([PlanFile.build(tiny_llama.info, [uniform_of(tiny_llama.info, "snapkv", 16)])],
                       length_ranges([(100, 200)], strict=True))
    ids = torch.randint(3, 60, (1, 400), generator=torch.Generator().manual_seed(0))
    with pytest.raises(PlanError, match="outside the lengths"), apply_plan(tiny_llama.model, strict, budget=16):
        tiny_llama.model.generate(ids, max_new_tokens=2, do_sample=False)


def test_an_engine_export_asks_which_length(two_rungs, tmp_path):
    with pytest.raises(PlanError, match="pick it with --context"):
        export_plan(two_rungs, to="trtllm", out=tmp_path / "t.json", budget=16)
    export_plan(two_rungs, to="trtllm", out=tmp_path / "t.json", budget=16, context=600)
    copied = PlanFile.load(export_plan(two_rungs, to="kvpress", out=tmp_path / "k.json", budget=16))
    assert copied == two_rungs  # kvpress reads the plan file: both rungs travel


def test_a_model_that_cannot_read_the_long_split_is_calibrated_on_the_default_short_one(caplog):
    from polykv_search.optimization.lengths import readable_splits
    from tests.plan.factories import llama_like, with_layer_types

    splits = ["calib.jsonl", "calib_long.jsonl"]
    short = with_layer_types(["full_attention"] * 2)  # reads 4,096 tokens
    with caplog.at_level("INFO"):
        assert readable_splits(splits, short, defaulted=True, long_context=8192) == ["calib.jsonl"]
    assert any("calibrating on calib.jsonl only" in r.getMessage() for r in caplog.records)
    assert readable_splits(splits, short, defaulted=False, long_context=8192) == splits  # the user's splits stay
    assert readable_splits(splits, llama_like(), defaulted=True, long_context=8192) == splits  # it reads 8,192
