"""Choose, per budget, among finished plans by a measurement on calibration samples.

Plans solved under different costs win at different budgets (on SmolLM2 the operating-point cost `around_kl`
at 64-256 tokens, the isolated `layer_kl` at 512). `choose` measures each plan file's rung at every budget with
the end-to-end objective on calibration samples (each prefilled once) and keeps the best rung per budget, so
the choice never reads the evaluation data. Uniform policies can stand as candidates too, so that a budget where
no plan measures better keeps the best single policy. Ties go to a second measure when one is given (the task
score ties often on a few samples: then the share of the output lost decides), then to the earlier candidate.
The guard (optimization/guard.py) is the same measurement with a bias for the optimized plan.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from polykv_search.data import Sample
from polykv_search.engine.objective import Measures
from polykv_search.engine.progress import Progress
from polykv_search.errors import ConfigError
from polykv_search.models import LoadedModel
from polykv_search.optimization.measure import RungMeasure
from polykv_search.plan import Plan, PlanFile, uniform_ladders
from polykv_search.plan.names import Metric


@dataclass
class Choice:
    """What was measured at one budget and which candidate won."""

    budget: float
    chosen: str  # the name of the winning file
    measured: dict[str, float]  # file name -> the metric at this budget (files holding this budget only)


def choose_rungs(plan_files: Sequence[tuple[str, PlanFile]],
                 measure: Callable[[list[Plan]], list[Measures]], *, metric: Metric,
                 tie_break: Metric | None = None) -> tuple[list[Plan], list[Choice]]:
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


def choose_among(lm: LoadedModel, named: list[tuple[str, PlanFile]], uniform: Sequence[str],
                 samples: Sequence[Sample], *, metric: Metric,
                 progress: Progress | None = None) -> tuple[PlanFile, list[Choice], int]:
    """`choose` on a loaded model: the named files (checked against the model) and a uniform ladder per policy in
    `uniform` measured on `samples` at every budget any file holds. Returns the chosen ladder, the choices and how
    many samples measured them."""
    for _, plan_file in named:
        plan_file.check_model(lm.info)
    budgets = sorted({b for _, f in named for b in f.budgets})
    question_aware = any(f.question_aware for _, f in named)  # RungMeasure refuses files of both settings
    named = named + uniform_ladders(lm.info, list(uniform), budgets, question_aware=question_aware)
    measure = RungMeasure(lm, list(samples), [f for _, f in named], metric=metric, stage="choose",
                          budgets=len(budgets), progress=progress)
    chosen, choices = choose_rungs(named, measure, metric=metric, tie_break="lost" if metric == "task" else None)
    return PlanFile.build(lm.info, chosen, question_aware=question_aware), choices, measure.samples
