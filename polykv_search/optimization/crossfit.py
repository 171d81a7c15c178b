"""Cross-fitting: plans optimized without the calibration samples they are measured on.

A plan per KV head makes hundreds of choices from a few calibration samples, so measured on those same samples it
looks better than it is: on SmolLM2's 24 calibration samples at 128 and 256 tokens per KV head, the plan's task loss
was 0.61 and 0.50 on the samples it was optimized on, 0.74 and 0.60 on samples it was not (two folds; the best single
policy 0.82 and 0.74; studies/guard_crossfit.py).
The guard asks the question a user cares about, whether the plan beats the single policies on data it has not
seen: the calibration samples are split into folds (each task spread over them in turn), and each fold is measured
with the plan optimized on the other folds, under the same config and budgets. The plan that is written is still
the one optimized on every sample.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from polykv_search.calibration.profile import Profile
from polykv_search.errors import ConfigError
from polykv_search.optimization.run import OptimizeConfig, optimize_profile
from polykv_search.plan import PlanFile

logger = logging.getLogger(__name__)

DEFAULT_FOLDS = 2


def task_folds(tasks: Sequence[str], folds: int) -> list[int]:
    """The fold of each sample: the samples grouped by task (tasks in order of appearance, samples in theirs) are
    dealt to folds 0, 1, ..., folds - 1, 0, ... in turn, so each task is spread over the folds and no fold is empty
    while there are at least `folds` samples."""
    by_task: dict[str, list[int]] = {}
    for i, task in enumerate(tasks):
        by_task.setdefault(task, []).append(i)
    out = [0] * len(tasks)
    for turn, i in enumerate(i for members in by_task.values() for i in members):
        out[i] = turn % folds
    return out


def crossfit_obstacle(profile: Profile, config: OptimizeConfig, folds: int = DEFAULT_FOLDS) -> str | None:
    """Why the plans of `profile` under `config` cannot be cross-fitted in `folds` folds, or None when they can."""
    if folds < 2:
        return f"cross-fitting needs at least 2 folds, got {folds}"
    if config.end_to_end:
        return (f"--solver {config.solver} measures plans on every calibration sample; the guard can only cross-fit "
                "plans solved from the profile (dp, ilp)")
    ids = profile.meta.sample_ids
    if len(ids) != profile.num_samples or None in ids or len(set(ids)) != len(ids):
        return "the profile does not name each of its samples; re-run calibrate to cross-fit its plans"
    if len(ids) < folds:
        return f"{len(ids)} calibration samples cannot be split into {folds} folds"
    return None


def fold_plans(profile: Profile, budgets: Sequence[float], *, config: OptimizeConfig,
               folds: int = DEFAULT_FOLDS) -> tuple[dict[str, int], list[PlanFile]]:
    """(sample id -> its fold, the ladder optimized without that fold's samples, one per fold); ConfigError with
    `crossfit_obstacle`'s reason when there is one."""
    obstacle = crossfit_obstacle(profile, config, folds)
    if obstacle:
        raise ConfigError(obstacle)
    samples = profile.meta.samples
    fold = task_folds([s.task for s in samples], folds)
    with _solver_logs_quiet():  # the fold solves are the guard's detail; the plan's own solves are logged
        files = [optimize_profile(profile.subset([i for i, f in enumerate(fold) if f != k]), budgets, config=config)
                 for k in range(folds)]
    logger.info("guard: %d fold plans optimized%s, each without its fold's calibration samples", folds,
                f" ({len(config.policies)} candidate policies)" if config.policies else "")
    return {str(s.id): f for s, f in zip(samples, fold)}, files


@contextmanager
def _solver_logs_quiet() -> Iterator[None]:
    """Solver INFO lines (one per budget and fold) held back; warnings still show."""
    solvers = logging.getLogger("polykv_search.optimization")
    level = solvers.level
    solvers.setLevel(max(logging.WARNING, level))
    try:
        yield
    finally:
        solvers.setLevel(level)
