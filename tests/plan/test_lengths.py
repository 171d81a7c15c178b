"""Plans by prompt length (schema 2.1): a rung's `context`, its validation, and the choice of a rung by length."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from polykv_search.errors import ConfigError, PlanError
from polykv_search.optimization.lengths import by_length, length_ranges, with_context
from polykv_search.plan import PlanFile, validate_plan_json
from polykv_search.plan.plan import ContextRange, rung_for_length
from tests.plan.factories import llama_like
from tests.plans import uniform_of

INFO = llama_like(4)


def _ladder(policy: str, budgets=(64, 128)) -> PlanFile:
    return PlanFile.build(INFO, [uniform_of(INFO, policy, b) for b in budgets])


@pytest.fixture
def two_lengths() -> PlanFile:
    ranges = length_ranges([(1100, 3900), (6500, 7566)])
    return by_length([_ladder("snapkv"), _ladder("streaming")], ranges)


def test_ranges_cover_every_length_split_between_the_buckets():
    short, long = length_ranges([(1100, 3900), (6500, 7566)])
    assert (short.min_tokens, long.max_tokens) == (0, None)
    assert short.max_tokens + 1 == long.min_tokens and 3900 < short.max_tokens < 6500
    assert short.calibrated == (1100, 3900) and long.calibrated == (6500, 7566)
    strict = length_ranges([(1100, 3900)], strict=True)[0]
    assert strict.strict and strict.max_tokens == 4875  # 1.25 x the longest calibration context
    with pytest.raises(ConfigError, match="overlap"):
        length_ranges([(1100, 3900), (3000, 7000)])


def test_a_ladder_by_length_round_trips_and_validates(two_lengths, tmp_path):
    assert two_lengths.schema_version == "2.1.0" and two_lengths.by_length
    assert two_lengths.budgets == [64, 128] and len(two_lengths.plans) == 4
    assert PlanFile.load(two_lengths.save(tmp_path / "p.json")) == two_lengths
    assert validate_plan_json(json.loads(two_lengths.to_json())) == []


def test_the_rung_is_the_one_whose_range_holds_the_prompt(two_lengths):
    assert two_lengths.plan_for(128, context_tokens=2000).layers[0].policy == "snapkv"
    assert two_lengths.plan_for(128, context_tokens=7000).layers[0].policy == "streaming"
    assert two_lengths.plan_for(128, context_tokens=50_000).layers[0].policy == "streaming"  # the nearest
    with pytest.raises(PlanError, match="one per range of prompt lengths"):
        two_lengths.plan_for(128)


def test_a_strict_plan_refuses_prompts_outside_its_lengths():
    ladder = with_context(_ladder("snapkv"), length_ranges([(1100, 3900)], strict=True)[0])
    assert ladder.plan_for(64, context_tokens=4000).layers[0].policy == "snapkv"
    with pytest.raises(PlanError, match="outside the lengths this plan serves"):
        ladder.plan_for(64, context_tokens=9000)


def test_far_beyond_is_measured_from_the_calibration_lengths():
    made = ContextRange(calibrated=(1000, 4000))
    assert not made.far_beyond(5000) and made.far_beyond(5001)
    assert not ContextRange().far_beyond(10**6)


@pytest.mark.parametrize("edit, message", [
    (lambda o: o.update(schema_version="2.0.0"), "need schema_version 2.1"),
    (lambda o: o["plans"][1]["context"].update(min_tokens=100), "overlaps"),
    (lambda o: o["plans"][1].pop("context"), "repeats"),
    (lambda o: o["plans"][0]["context"].update(max_tokens=-1), "max_tokens"),
    (lambda o: o["plans"][0]["context"].update(calibrated=[9, 1]), "shortest, longest"),
    (lambda o: o["plans"][0]["context"].update(extra=1), "extra"),
])
def test_bad_lengths_are_named(two_lengths, edit, message):
    obj = json.loads(two_lengths.to_json())
    edit(obj)
    problems = validate_plan_json(obj)
    assert any(message in p for p in problems), problems


def test_files_without_lengths_keep_their_versions():
    plain = _ladder("snapkv")
    assert plain.schema_version == "1.0.0" and not plain.by_length
    assert plain.plan_for(64) == plain.plans[0] and plain.plan_for(64, context_tokens=10**6) == plain.plans[0]


def test_by_length_needs_the_same_budgets():
    with pytest.raises(ConfigError, match="same budgets"):
        by_length([_ladder("snapkv"), _ladder("streaming", (64, 256))], length_ranges([(1, 2), (5, 6)]))


def test_rung_for_length_without_ranges_takes_the_lone_rung():
    rung = uniform_of(INFO, "snapkv", 64)
    assert rung_for_length([rung], 123) is rung
    assert rung_for_length([replace(rung, context=ContextRange(min_tokens=10))], None).context.min_tokens == 10
