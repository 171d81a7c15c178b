"""Plan files by name, as `choose` and `evaluate` compare them, and a file cut to the budgets asked for."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from polykv_search.errors import ConfigError
from polykv_search.plan.plan import PlanFile, load_plan, setting_name

logger = logging.getLogger(__name__)


def named_plan_files(plans: Mapping[str, PlanFile | str | Path] | Sequence[str | Path]) -> list[tuple[str, PlanFile]]:
    """(name, plan file) for name -> file or path, or for paths (named by their stem); ConfigError on a repeated
    name."""
    items = plans.items() if isinstance(plans, Mapping) else [(Path(p).stem, p) for p in plans]
    named = [(str(name), plan if isinstance(plan, PlanFile) else load_plan(plan)) for name, plan in items]
    names = [name for name, _ in named]
    if len(set(names)) != len(names):
        raise ConfigError(f"plan files need distinct names, got {', '.join(names)}; rename one of them")
    return named


def warn_other_setting(named: Sequence[tuple[str, PlanFile]], question_aware: bool) -> None:
    """Say once per plan made for the other setting (question compressed with the context, or asked after it)
    that it is about to be answered in this one: its figures are then not the ones it was made for."""
    for name, plan_file in named:
        if plan_file.question_aware != question_aware:
            flag = "pass --question-aware (question_aware=True)" if plan_file.question_aware else \
                "drop --question-aware (question_aware=False)"
            logger.warning("plan %s was made for the %s setting and is answered %s here; %s to answer it as made",
                           name, plan_file.setting, setting_name(question_aware), flag)


def only_budgets(name: str, plan_file: PlanFile, grid: Sequence[float]) -> PlanFile:
    """The plan file's rungs at the asked budgets: a rung with no baseline beside it would only cost time."""
    kept = [p for p in plan_file.plans if p.average_budget in grid]
    if not kept:
        have = ", ".join(f"{p.average_budget:g}" for p in plan_file.plans)
        raise ConfigError(f"plan {name} has budgets {have}, none of them in --budgets "
                          f"{','.join(f'{b:g}' for b in grid)}; add one of its budgets or leave --budgets out")
    return replace(plan_file, plans=tuple(kept))
