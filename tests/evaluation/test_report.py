"""The report's gap recovery and its bootstrap interval, on hand-made scores."""

import pytest

from polykv_search.evaluation import Method, ScoredResult, summarize
from tests.conftest import tiny_loaded
from tests.plans import uniform_of


def _rows(method: str, scores: dict[str, list[float]]) -> list[ScoredResult]:
    return [ScoredResult(sample_id=f"{task}-{i}", task=task, method=method, answer="", score=s, kl=0.0,
                         kept_all_layers=[], context_tokens=100)
            for task, values in scores.items() for i, s in enumerate(values)]


def _method(name: str, family: str) -> Method:
    return Method(name, family, uniform_of(tiny_loaded("llama").info, "snapkv", 64))


def test_recovery_and_its_interval():
    full = {"a": [1, 1, 1, 1], "b": [1, 1, 1, 0]}
    uniform = {"a": [0, 0, 1, 0], "b": [1, 0, 0, 0]}
    better = {"a": [1, 0, 1, 1], "b": [1, 0, 1, 0]}  # never below the uniform policy, sample by sample
    results = (_rows("full", full) + _rows("u@64", uniform) + _rows("plan@64", better)
               + _rows("same@64", uniform))
    methods = [_method("u", "uniform"), _method("plan", "plan"), _method("same", "plan")]
    report = summarize(results, methods)
    rows = {r.method: r for r in report.recovery}
    s_full, s_u, s_plan = (7 / 4) / 2, (2 / 4) / 2, (5 / 4) / 2
    assert rows["plan"].R == pytest.approx((s_plan - s_u) / (s_full - s_u))
    low, high = rows["plan"].R_90
    assert 0.0 <= low <= rows["plan"].R <= high <= 1.0  # paired: a plan never below it cannot dip below 0
    assert rows["same"].R == 0.0 and rows["same"].R_90 == [0.0, 0.0]
    assert "R 90% bootstrap" in report.markdown()
    assert report.recovery_of("plan") == [rows["plan"]]
    assert type(report).from_dict(report.to_dict()) == report  # the JSON round-trips
