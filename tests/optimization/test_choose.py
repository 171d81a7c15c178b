"""choose: per budget, the rung that measures best; notes say what it was chosen over."""

import pytest

from polykv_search.errors import ConfigError
from polykv_search.optimization.choose import choose_rungs, guard_rungs
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


def test_the_guard_keeps_the_plan_unless_a_uniform_policy_scores_better():
    info = tiny_loaded("llama").info
    plan = ladder(info, "snapkv", [16, 32])
    uniform = [("knorm", ladder(info, "knorm", [16, 32])), ("streaming", ladder(info, "streaming", [16, 32]))]
    # at 16 the plan ties the best uniform policy on the task (kept); at 32 two policies beat it, tied on the
    # task, and the share lost decides between them
    task = {16: {"snapkv": 0.5, "knorm": 0.5, "streaming": 0.7}, 32: {"snapkv": 0.6, "knorm": 0.4, "streaming": 0.4}}
    lost = {"snapkv": 0.1, "knorm": 0.3, "streaming": 0.2}

    def measure(candidates):
        return [{"task": task[p.average_budget][next(x for x in p.policies if x)],
                 "lost": lost[next(x for x in p.policies if x)]} for p in candidates]

    plans, choices = guard_rungs(plan, uniform, measure)
    assert [c.chosen for c in choices] == ["plan", "streaming"]
    assert choices[1].measured == {"plan": 0.6, "knorm": 0.4, "streaming": 0.4}
    assert set(plans[0].policies) - {None} == {"snapkv"} and "guard: kept" in plans[0].search.notes
    assert set(plans[1].policies) - {None} == {"streaming"}
    assert "worse than uniform streaming" in plans[1].search.notes and plans[1].average_budget == 32
    assert plans[1].search.solver == "manual"  # the uniform candidate's own provenance, with the guard's note
    with pytest.raises(ConfigError, match="at least one uniform policy"):
        guard_rungs(plan, [], measure)


def test_the_guard_takes_the_best_optimized_ladder_per_budget_then_holds_it_to_the_uniform_policies():
    info = tiny_loaded("llama").info
    plan, wide = ladder(info, "snapkv", [16, 32, 64]), ladder(info, "tova", [16, 32, 64])
    uniform = [("streaming", ladder(info, "streaming", [16, 32, 64]))]
    # 16: the plan wins over its alternative and the uniform policy; 32: the alternative ties the plan on the task
    # and loses less of the output; 64: the uniform policy beats both optimized rungs
    task = {16: {"snapkv": 0.3, "tova": 0.5, "streaming": 0.6}, 32: {"snapkv": 0.4, "tova": 0.4, "streaming": 0.6},
            64: {"snapkv": 0.5, "tova": 0.4, "streaming": 0.3}}
    lost = {"snapkv": 0.2, "tova": 0.1, "streaming": 0.3}
    seen = []

    def measure(candidates):
        seen.append([next(x for x in p.policies if x) for p in candidates])
        return [{"task": task[p.average_budget][next(x for x in p.policies if x)],
                 "lost": lost[next(x for x in p.policies if x)]} for p in candidates]

    plans, choices = guard_rungs(plan, uniform, measure, alternatives=[("plan (wide)", wide)])
    assert seen[0] == ["snapkv", "tova", "streaming"]  # the plan, the alternatives, the uniform policies
    assert [c.chosen for c in choices] == ["plan", "plan (wide)", "streaming"]
    assert choices[1].measured == {"plan": 0.4, "plan (wide)": 0.4, "streaming": 0.6}
    assert set(plans[1].policies) - {None} == {"tova"} and "kept plan (wide)" in plans[1].search.notes
    assert "the optimized plans measured worse than uniform streaming" in plans[2].search.notes
    with pytest.raises(ConfigError, match="distinct names"):
        guard_rungs(plan, uniform, measure, alternatives=[("streaming", wide)])
    with pytest.raises(ConfigError, match="the same budgets"):
        guard_rungs(plan, uniform, measure, alternatives=[("plan (wide)", ladder(info, "tova", [16]))])
