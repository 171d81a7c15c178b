"""Choose, per budget, among finished plans by a measurement on calibration samples.

Plans solved under different costs win at different budgets (on SmolLM2 the operating-point cost `around_kl`
at 64-256 tokens, the isolated `layer_kl` at 512). `choose` measures each plan file's rung at every budget with
the end-to-end objective on calibration samples (each prefilled once) and keeps the best rung per budget, so
the choice never reads the evaluation data. Uniform policies can stand as candidates too, so that a budget where
no plan measures better keeps the best single policy. Ties go to a second measure when one is given (the task
score ties often on a few samples: then the share of the output lost decides), then to the earlier candidate.

`guard_rungs` is the same measurement with a bias for the optimized plan: `run` keeps the plan's rung wherever it
scores at least as well as every uniform policy on the calibration samples, and writes the best uniform policy in
its place where it does not, so the plan a user gets is never below a single policy on the data it was made from.
Given other optimized ladders too (`run`'s per-head default: the plan with six candidate policies and the plan
with eleven), it first takes the best optimized rung per budget, then holds it to the same test.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from polykv_search.errors import ConfigError
from polykv_search.plan import Plan, PlanFile


@dataclass
class Choice:
    budget: float
    chosen: str  # the name of the winning file
    measured: dict[str, float]  # file name -> the metric at this budget (files holding this budget only)


def choose_rungs(plan_files: Sequence[tuple[str, PlanFile]],
                 measure: Callable[[list[Plan]], list[dict[str, float]]], *, metric: str,
                 tie_break: str | None = None) -> tuple[list[Plan], list[Choice]]:
    """For every budget held by any file, the rung with the lowest measured `metric` (then `tie_break`); the
    plan's search notes say what it was chosen over."""
    if len(plan_files) < 2:
        raise ConfigError("give at least two plan files to choose from (--plan a.json --plan b.json)")
    names = [name for name, _ in plan_files]
    if len(set(names)) != len(names):
        raise ConfigError(f"plan files need distinct names, got {', '.join(names)}; rename one of them")
    budgets = sorted({p.average_budget for _, f in plan_files for p in f.plans})
    plans, choices = [], []
    for budget in budgets:
        rungs = [(name, f.plan_for(budget)) for name, f in plan_files if budget in f.budgets]
        values = measure([p for _, p in rungs])
        measured = {name: float(v[metric]) for (name, _), v in zip(rungs, values)}
        best = min(range(len(rungs)), key=lambda i: (values[i][metric], values[i][tie_break] if tie_break else 0.0))
        name, plan = rungs[best]
        others = ", ".join(f"{n}={v:.4g}" for n, v in measured.items())
        then = f" then {tie_break}" if tie_break else ""
        note = f"chosen from {name} by mean {metric}{then} on calibration samples ({others})"
        notes = f"{plan.search.notes}; {note}" if plan.search.notes else note
        plans.append(replace(plan, search=replace(plan.search, notes=notes)))
        choices.append(Choice(budget=budget, chosen=name, measured=measured))
    return plans, choices


def guard_rungs(plan_file: PlanFile, uniform: Sequence[tuple[str, PlanFile]],
                measure: Callable[[list[Plan]], list[dict[str, float]]], *, metric: str = "task",
                tie_break: str = "lost", name: str = "plan", where: str = "on calibration samples",
                alternatives: Sequence[tuple[str, PlanFile]] = ()) -> tuple[list[Plan], list[Choice]]:
    """Per budget of `plan_file`: the best optimized rung, of the plan's and the `alternatives`' (other optimized
    ladders of the same budgets, e.g. with other candidate policies; lowest `metric`, then `tie_break`, then the
    earlier), where its `metric` is at most every uniform candidate's (a tie keeps it), else the uniform rung
    lowest by `metric` then `tie_break`. `measure` gets the rungs in that order: the plan's, the alternatives',
    the uniform ones. Each kept or replaced rung's search notes say what was measured, and `where`; a replaced
    rung is the uniform plan itself (solver "uniform")."""
    if not uniform:
        raise ConfigError("the guard needs at least one uniform policy to compare the plan with")
    names = [name, *(n for n, _ in alternatives), *(n for n, _ in uniform)]
    if len(set(names)) != len(names):
        raise ConfigError(f"the guard's candidates need distinct names, got {', '.join(names)}")
    for alt_name, alt in alternatives:
        if alt.budgets != plan_file.budgets:
            raise ConfigError(f"the alternative ladder {alt_name} has budgets {alt.budgets}, the plan "
                              f"{plan_file.budgets}: the guard compares rungs of the same budgets")
    optimized = 1 + len(alternatives)
    plans, choices = [], []
    for budget in plan_file.budgets:
        rungs = ([(name, plan_file.plan_for(budget))] + [(n, f.plan_for(budget)) for n, f in alternatives]
                 + [(n, f.plan_for(budget)) for n, f in uniform])
        values = measure([p for _, p in rungs])
        measured = {n: float(v[metric]) for (n, _), v in zip(rungs, values)}

        def order(i: int) -> tuple[float, float]:
            return values[i][metric], values[i][tie_break]

        top = min(range(optimized), key=order)  # min keeps the earliest of equals
        best = min(range(optimized, len(rungs)), key=order)
        others = ", ".join(f"{n}={v:.4g}" for n, v in measured.items())
        keep = values[top][metric] <= values[best][metric]
        chosen_name, plan = rungs[top] if keep else rungs[best]
        if keep and optimized > 1:
            note = (f"guard: kept {chosen_name}, the best optimized rung by mean {metric} (then {tie_break}), at "
                    f"most every uniform policy's {where} ({others})")
        elif keep:
            note = f"guard: kept, mean {metric} at most every uniform policy's {where} ({others})"
        else:
            worse = "the optimized plans" if optimized > 1 else "the optimized plan"
            note = (f"guard: {worse} measured worse than uniform {chosen_name} by mean {metric} "
                    f"{where} ({others}); this rung is that uniform policy")
        notes = f"{plan.search.notes}; {note}" if plan.search.notes else note
        plans.append(replace(plan, search=replace(plan.search, notes=notes)))
        choices.append(Choice(budget=budget, chosen=chosen_name, measured=measured))
    return plans, choices
