"""choose: per budget, the rung that measures best; notes say what it was chosen over."""

import pytest

from polykv_search.errors import ConfigError
from polykv_search.optimization.choose import choose_rungs
from polykv_search.plan import PlanFile, SearchInfo
from tests.conftest import tiny_loaded
from tests.plans import plan_of


def ladder(info, policy, budgets):
    n = info.num_layers
    plans = [plan_of(info, [policy] * n, [b] * n, average=b, search=SearchInfo(solver="manual", status="x"))
             for b in budgets]
    return PlanFile.build(info, plans)


def test_each_budget_keeps_the_lowest_measured_rung_and_says_so():
    info = tiny_loaded("llama").info
    files = [("a", ladder(info, "snapkv", [16, 32])), ("b", ladder(info, "knorm", [16])),
             ("c", ladder(info, "streaming", [32]))]
    cost = {"snapkv": 0.5, "knorm": 0.2, "streaming": 0.9}
    measured_calls = []

    def measure(candidates):
        measured_calls.append(len(candidates))
        return [{"lost": cost[next(p for p in plan.policies if p)]} for plan in candidates]

    plans, choices = choose_rungs(files, measure, metric="lost")
    assert [p.average_budget for p in plans] == [16, 32]
    assert [c.chosen for c in choices] == ["b", "a"]
    assert choices[0].measured == {"a": 0.5, "b": 0.2} and choices[1].measured == {"a": 0.5, "c": 0.9}
    assert set(plans[0].policies) - {None} == {"knorm"}
    assert "chosen from b by mean lost" in plans[0].search.notes and measured_calls == [2, 2]
    with pytest.raises(ConfigError, match="at least two"):
        choose_rungs(files[:1], measure, metric="lost")
    with pytest.raises(ConfigError, match="distinct names"):
        choose_rungs([files[0], ("a", files[1][1])], measure, metric="lost")



def test_ties_go_to_the_second_measure_then_to_the_earlier_candidate():
    info = tiny_loaded("llama").info
    files = [("a", ladder(info, "snapkv", [16])), ("b", ladder(info, "knorm", [16])),
             ("c", ladder(info, "streaming", [16]))]
    task = {"snapkv": 0.5, "knorm": 0.25, "streaming": 0.25}  # b and c tie on the task
    lost = {"snapkv": 0.1, "knorm": 0.4, "streaming": 0.3}

    def measure(candidates):
        names = [next(p for p in plan.policies if p) for plan in candidates]
        return [{"task": task[n], "lost": lost[n]} for n in names]

    _, choices = choose_rungs(files, measure, metric="task", tie_break="lost")
    assert choices[0].chosen == "c" and choices[0].measured == {"a": 0.5, "b": 0.25, "c": 0.25}
    _, choices = choose_rungs(files, measure, metric="task")
    assert choices[0].chosen == "b"  # no second measure: the earlier of the tied candidates
    plans, _ = choose_rungs(files, measure, metric="task", tie_break="lost")
    assert "by mean task then lost" in plans[0].search.notes
