"""The plan's setting (schema 2.2): `question_aware` round-trips, is validated against the version, and a plan
made for the other setting is said so where it is applied or measured."""

from __future__ import annotations

import json
import logging

import pytest

from polykv_search.errors import ConfigError
from polykv_search.optimization.measure import RungMeasure
from polykv_search.plan import PlanFile, uniform_ladders, validate_plan_json
from polykv_search.plan.named import warn_other_setting
from polykv_search.runtime import PlanPress
from tests.plan.factories import llama_like
from tests.plans import uniform_of

INFO = llama_like(4)


def _ladder(*, question_aware: bool) -> PlanFile:
    return PlanFile.build(INFO, [uniform_of(INFO, "snapkv", b) for b in (64, 128)], question_aware=question_aware)


def test_the_setting_round_trips_with_the_lowest_version_that_holds_it(tmp_path):
    aware, agnostic = _ladder(question_aware=True), _ladder(question_aware=False)
    assert aware.schema_version == "2.2.0" and agnostic.schema_version == "1.0.0"
    assert json.loads(aware.to_json())["question_aware"] is True
    assert "question_aware" not in json.loads(agnostic.to_json())  # what every earlier file means
    assert PlanFile.load(aware.save(tmp_path / "a.json")) == aware
    assert PlanFile.load(agnostic.save(tmp_path / "b.json")) == agnostic
    assert aware.setting == "question-aware" and agnostic.setting == "query-agnostic"


@pytest.mark.parametrize("edit, message", [
    ({"schema_version": "2.1.0"}, "needs schema_version 2.2 or later"),
    ({"question_aware": "yes"}, "question_aware"),
])
def test_a_bad_setting_is_named(edit, message):
    data = {**json.loads(_ladder(question_aware=True).to_json()), **edit}
    problems = validate_plan_json(data)
    assert problems and any(message in p for p in problems)


def test_uniform_ladders_carry_the_setting_and_measures_refuse_a_mix():
    [(_, aware)] = uniform_ladders(INFO, ["streaming"], [64], question_aware=True)
    assert aware.question_aware
    with pytest.raises(ConfigError, match="different settings"):
        RungMeasure(None, [], [aware, _ladder(question_aware=False)], metric="task", stage="guard", budgets=1)


def test_the_other_setting_is_said_once_per_plan(caplog, tmp_path):
    aware, agnostic = _ladder(question_aware=True), _ladder(question_aware=False)
    with caplog.at_level(logging.WARNING):
        warn_other_setting([("a", aware), ("b", agnostic)], question_aware=False)
    [line] = [r.getMessage() for r in caplog.records]
    assert line.startswith("plan a was made for the question-aware setting") and "pass --question-aware" in line
    caplog.clear()
    path = aware.save(tmp_path / "a.json")
    with caplog.at_level(logging.WARNING):
        PlanPress.from_file(path, budget=64, question_aware=True)  # the same setting: nothing to say
        PlanPress.from_file(path, budget=64)  # not told: not checked
    assert not caplog.records
    with caplog.at_level(logging.WARNING):
        PlanPress.from_file(path, budget=64, question_aware=False)
    assert len(caplog.records) == 1 and "a.json" in caplog.records[0].getMessage()
