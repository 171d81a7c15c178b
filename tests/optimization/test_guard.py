"""The guard: per budget, the best optimized rung where it measures at least as well as every uniform policy, else
the best uniform policy; each rung says what was measured and why it won."""

import pytest

from polykv_search.calibration.modes import COST_MODES, calibration_for_cost
from polykv_search.calibration.profile import ALL_COST_KINDS
from polykv_search.errors import ConfigError
from polykv_search.optimization.guard import GuardRung, guard_rungs
from tests.conftest import tiny_loaded
from tests.optimization.test_choose import ladder


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


def test_each_guard_rung_says_in_fields_what_won_and_why():
    info = tiny_loaded("llama").info
    plan, wide = ladder(info, "snapkv", [16, 32]), ladder(info, "tova", [16, 32])
    uniform = [("plan (11 policies)", ladder(info, "streaming", [16, 32]))]  # a policy named like a plan
    task = {16: {"snapkv": 0.3, "tova": 0.5, "streaming": 0.6}, 32: {"snapkv": 0.5, "tova": 0.5, "streaming": 0.3}}

    def measure(candidates):
        return [{"task": task[p.average_budget][next(x for x in p.policies if x)], "lost": 0.1} for p in candidates]

    _, rungs = guard_rungs(plan, uniform, measure, alternatives=[("plan (wide)", wide)])
    assert all(isinstance(r, GuardRung) for r in rungs)
    assert [(r.chosen, r.kept_plan) for r in rungs] == [("plan", True), ("plan (11 policies)", False)]
    assert rungs[0].optimized == ("plan", "plan (wide)") and rungs[0].metric == "task" and rungs[0].tie_break == "lost"
    assert rungs[1].second == {"plan": 0.1, "plan (wide)": 0.1, "plan (11 policies)": 0.1}
    assert "measured worse than uniform plan (11 policies)" in rungs[1].reason


def test_run_calibrates_each_cost_with_the_mode_that_measures_it():
    assert set(COST_MODES) == set(ALL_COST_KINDS)
    assert calibration_for_cost("head_fisher", budgets=[128]).head_fisher
    assert calibration_for_cost("layer_nll", budgets=[128]).layer_kl
    assert calibration_for_cost("around_kl", budgets=[64, 128]).around == (64, 128)
    plain = calibration_for_cost("mass_lost", budgets=[128], policies=["snapkv"], grid=[8, 16])
    assert (plain.policies, plain.budgets, plain.layer_kl, plain.head_kl) == (("snapkv",), (8, 16), False, False)
    with pytest.raises(ConfigError, match="has a fraction"):
        calibration_for_cost("around_kl", budgets=[64.5])


def test_a_kept_rung_that_keeps_what_a_uniform_policy_keeps_says_so():
    from polykv_search.cli.run import kept_name

    info = tiny_loaded("llama").info
    # an engine target's plan often is the engine's own setting: the guard keeps it (a tie) and names the twin
    plan = ladder(info, "streaming", [16, 32])
    uniform = [("knorm", ladder(info, "knorm", [16, 32])), ("streaming", ladder(info, "streaming", [16, 32]))]

    def measure(candidates):
        return [{"task": 0.5, "lost": 0.1} for _ in candidates]

    plans, rungs = guard_rungs(plan, uniform, measure)
    assert [r.same_as for r in rungs] == ["streaming", "streaming"] and all(r.kept_plan for r in rungs)
    assert "keeps exactly what uniform streaming keeps" in plans[0].search.notes
    assert kept_name(rungs[0]) == "optimized plan (= streaming)"
    other = ladder(info, "snapkv", [16, 32])  # a plan of its own names no twin
    _, rungs = guard_rungs(other, uniform, measure)
    assert [r.same_as for r in rungs] == [None, None] and kept_name(rungs[0]) == "optimized plan"


def test_with_confirm_a_rung_must_also_answer_closer_than_the_uniform_one_and_the_lowest_kl_of_those_wins():
    from polykv_search.cli.run import kept_name

    info = tiny_loaded("llama").info
    plan, shape = ladder(info, "snapkv", [16, 32, 64]), ladder(info, "tova", [16, 32, 64])
    uniform = [("streaming", ladder(info, "streaming", [16, 32, 64]))]
    # 16: the plan wins on the task but answers farther (KL) than the window, the shape ties it on the task and is
    #     closer: the shape; 32: both pass, the shape's KL is lower though the plan's task loss is: the shape;
    # 64: the plan is better on the task, not on the KL, the shape the reverse: neither passes, the window is kept
    task = {16: {"snapkv": 0.5, "tova": 0.6, "streaming": 0.6}, 32: {"snapkv": 0.3, "tova": 0.5, "streaming": 0.6},
            64: {"snapkv": 0.4, "tova": 0.7, "streaming": 0.6}}
    kl = {16: {"snapkv": 3.0, "tova": 2.0, "streaming": 2.5}, 32: {"snapkv": 2.2, "tova": 2.1, "streaming": 2.5},
          64: {"snapkv": 2.5, "tova": 1.0, "streaming": 2.5}}

    def measure(candidates):
        return [{"task": task[p.average_budget][next(x for x in p.policies if x)],
                 "kl": kl[p.average_budget][next(x for x in p.policies if x)], "lost": 0.1} for p in candidates]

    plans, rungs = guard_rungs(plan, uniform, measure, alternatives=[("inverted windows", shape)], tie_break="kl",
                               confirm=True)
    assert [r.chosen for r in rungs] == ["inverted windows", "inverted windows", "streaming"]
    assert [r.kept_plan for r in rungs] == [True, True, False]
    assert rungs[0].second == {"plan": 3.0, "inverted windows": 2.0, "streaming": 2.5}
    assert "the lowest by kl" in plans[0].search.notes and "mean kl: plan=3" in plans[0].search.notes
    assert "no optimized rung measured at most uniform streaming's mean task and below its mean kl" in \
        plans[2].search.notes
    assert set(plans[1].policies) - {None} == {"tova"} and set(plans[2].policies) - {None} == {"streaming"}
    assert kept_name(rungs[0]) == "inverted windows"  # a fixed shape is not an optimized plan
    # without confirm the same figures keep the plan wherever its task loss is the lowest (the default guard)
    _, plain = guard_rungs(plan, uniform, measure, alternatives=[("inverted windows", shape)], tie_break="kl")
    assert [r.chosen for r in plain] == ["plan", "plan", "plan"]


def test_an_alternative_takes_the_plans_place_only_with_a_lead_sure_at_90_percent():
    from polykv_search.optimization.lead import Lead  # imported here: only this test builds leads by hand

    info = tiny_loaded("llama").info
    plan, wide = ladder(info, "snapkv", [16, 32, 64, 128]), ladder(info, "tova", [16, 32, 64, 128])
    uniform = [("streaming", ladder(info, "streaming", [16, 32, 64, 128]))]
    # the alternative measures lower at every budget; its lead over the plan is within chance at 16, sure at 32;
    # at 64 no interval is known, so the mean decides as without leads; at 128 the plan fails against the uniform
    # policy and the alternative passes: a lead within chance does not hand the rung to the uniform policy
    task = {16: {"snapkv": 0.40, "tova": 0.38, "streaming": 0.6}, 32: {"snapkv": 0.40, "tova": 0.30, "streaming": 0.6},
            64: {"snapkv": 0.40, "tova": 0.35, "streaming": 0.6}, 128: {"snapkv": 0.65, "tova": 0.58, "streaming": 0.6}}
    chance = Lead("plan", 0.02, -0.01, 0.05, 24)
    leads = {16: chance, 32: Lead("plan", 0.10, 0.04, 0.16, 24), 64: None, 128: chance}
    asked = []

    def measure(candidates):
        return [{"task": task[p.average_budget][next(x for x in p.policies if x)], "lost": 0.1} for p in candidates]

    def lead(budget, i, j):
        asked.append((budget, i, j))
        return leads[budget]

    plans, rungs = guard_rungs(plan, uniform, measure, alternatives=[("plan (wide)", wide)], lead=lead)
    assert [r.chosen for r in rungs] == ["plan", "plan (wide)", "plan (wide)", "plan (wide)"]
    assert asked == [(16, 1, 0), (32, 1, 0), (64, 1, 0)]  # the alternative against the plan, where the plan passes
    stood = "plan stands, plan (wide)'s lead within chance: lead over plan +0.020 [90%: -0.010, +0.050]"
    assert stood in rungs[0].reason
    assert set(plans[0].policies) - {None} == {"snapkv"}
    assert "its lead sure at 90%: lead over plan +0.100 [90%: +0.040, +0.160]" in rungs[1].reason
    _, by_mean = guard_rungs(plan, uniform, measure, alternatives=[("plan (wide)", wide)])
    assert [r.chosen for r in by_mean] == ["plan (wide)"] * 4  # without leads the lowest mean wins


def test_with_confirm_the_engines_own_setting_stands_unless_a_candidates_lead_over_it_is_sure():
    from polykv_search.optimization.lead import Lead  # imported here: only these tests build leads by hand

    info = tiny_loaded("llama").info
    plan, shape = ladder(info, "snapkv", [16, 32]), ladder(info, "tova", [16, 32])
    uniform = [("streaming", ladder(info, "streaming", [16, 32]))]
    # both candidates pass the means' tests at both budgets, the shape with the lower KL; at 16 the shape's lead over
    # the window is within chance and the plan's sure (the plan is kept), at 32 neither is sure (the window is)
    task = {"snapkv": 0.5, "tova": 0.5, "streaming": 0.6}
    kl = {"snapkv": 2.2, "tova": 2.0, "streaming": 2.5}
    sure = Lead("streaming", 0.1, 0.02, 0.2, 24)
    chance = Lead("streaming", 0.1, -0.03, 0.2, 24)
    leads = {(16, 0): sure, (16, 1): chance, (32, 0): chance, (32, 1): chance}
    asked = []

    def measure(candidates):
        return [{"task": task[next(x for x in p.policies if x)], "kl": kl[next(x for x in p.policies if x)],
                 "lost": 0.1} for p in candidates]

    def lead(budget, i, j):
        asked.append((i, j))
        return leads[budget, i]

    plans, rungs = guard_rungs(plan, uniform, measure, alternatives=[("inverted windows", shape)], tie_break="kl",
                               confirm=True, lead=lead)
    assert [r.chosen for r in rungs] == ["plan", "streaming"] and [r.kept_plan for r in rungs] == [True, False]
    assert set(asked) == {(0, 2), (1, 2)}  # each passing candidate against the engine's setting
    assert "not kept, their lead within chance: inverted windows (lead over streaming +0.100 [90%: -0.030" in \
        rungs[0].reason
    assert "no optimized rung passed every test against uniform streaming" in rungs[1].reason
    assert "chance: plan (lead over streaming" in rungs[1].reason and "this rung is that uniform policy" in rungs[1].reason


def test_with_confirm_a_fitted_candidate_is_kept_only_where_its_written_rung_passes_on_the_samples_too():
    from polykv_search.optimization.lead import Lead  # imported here: only these tests build leads by hand

    info = tiny_loaded("llama").info
    plan, shape = ladder(info, "snapkv", [16, 32, 64]), ladder(info, "tova", [16, 32, 64])
    uniform = [("streaming", ladder(info, "streaming", [16, 32, 64]))]
    # cross-fitted, the plan passes every test at every budget with the lower KL; the shape passes too (KL 2.1).
    # The plan's written rung, on the samples it was made from: 16 passes (the plan stands), 32 scores worse than the
    # window (the shape takes the rung), 64 passes the means with a lead within chance (the shape again)
    task = {"snapkv": 0.5, "tova": 0.55, "streaming": 0.6}
    kl = {"snapkv": 2.0, "tova": 2.1, "streaming": 2.5}
    sure = Lead("streaming", 0.1, 0.02, 0.2, 24)
    written_figures = {16: ({"task": 0.45, "kl": 1.9, "lost": 0.1}, sure),
                       32: ({"task": 0.65, "kl": 1.9, "lost": 0.1}, Lead("streaming", -0.05, -0.1, 0.0, 24)),
                       64: ({"task": 0.55, "kl": 2.2, "lost": 0.1}, Lead("streaming", 0.05, -0.01, 0.1, 24))}
    asked = []

    def measure(candidates):
        return [{"task": task[next(x for x in p.policies if x)], "kl": kl[next(x for x in p.policies if x)],
                 "lost": 0.1} for p in candidates]

    def written(budget, i, j):
        asked.append((budget, i, j))
        return written_figures[budget] if i == 0 else None  # the shape is not fitted

    plans, rungs = guard_rungs(plan, uniform, measure, alternatives=[("inverted windows", shape)], tie_break="kl",
                               confirm=True, lead=lambda budget, i, j: sure, written=written)
    assert [r.chosen for r in rungs] == ["plan", "inverted windows", "inverted windows"]
    assert set(asked) == {(b, i, 2) for b in (16, 32, 64) for i in (0, 1)}  # against the engine's setting
    assert ("the rung written, on the samples it was optimized on: mean task 0.45, kl 1.9, lead over streaming "
            "+0.100") in rungs[0].reason
    failing = "not kept, the rung written for it (optimized on every sample) failing the same tests on those samples"
    assert failing + ": plan (mean task 0.65, kl 1.9" in rungs[1].reason and failing in rungs[2].reason
    assert set(plans[1].policies) - {None} == {"tova"}
    _, unchecked = guard_rungs(plan, uniform, measure, alternatives=[("inverted windows", shape)], tie_break="kl",
                               confirm=True, lead=lambda budget, i, j: sure)
    assert [r.chosen for r in unchecked] == ["plan"] * 3  # without `written` the cross-fitted figures decide


def test_a_written_rung_without_per_sample_losses_is_held_to_the_means_alone():
    info = tiny_loaded("llama").info
    plan, uniform = ladder(info, "snapkv", [16, 32]), [("streaming", ladder(info, "streaming", [16, 32]))]
    written = {16: ({"task": 0.55, "kl": 2.0, "lost": 0.1}, None), 32: ({"task": 0.65, "kl": 2.0, "lost": 0.1}, None)}

    def measure(candidates):
        return [{"task": 0.6 if "streaming" in p.policies else 0.5, "kl": 2.5 if "streaming" in p.policies else 2.0,
                 "lost": 0.1} for p in candidates]

    _, rungs = guard_rungs(plan, uniform, measure, tie_break="kl", confirm=True,
                           written=lambda budget, i, j: written[budget])
    assert [r.chosen for r in rungs] == ["plan", "streaming"]  # 0.55 passes the window's 0.6; 0.65 does not
