"""Optuna search over policy-per-layer and budget vectors, scored end to end (per-layer losses are not exactly
additive at tight budgets, so the exact solver's proxy optimum is not always the true one).

Parametrisation: per compressible layer a categorical policy and an integer budget in [floor, cap]; a repair
step rescales the budgets to the exact total (largest remainder), and is the identity on a vector that already
sums to it, so seeds (the exact plan, every uniform plan, PyramidKV, CAKE) are represented exactly and enqueued
with `enqueue_trial`. The best trial is never worse than the best seed on the measured objective.
Storage: a journal file (several processes) or an RDB URL (several machines); a killed study resumes, and workers
that open one study name in one storage share it: `n_trials` is the study's total, each worker stopping once the
study has finished that many (docs/distributed.md).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from polykv_search.errors import MissingPackageError, SolverError
from polykv_search.models.info import ModelInfo
from polykv_search.plan import LayerPlan, Plan, SearchInfo, exact_integer_budgets

logger = logging.getLogger(__name__)
TRIAL = SearchInfo(solver="optuna", status="trial")


@dataclass
class SearchResult:
    plan: Plan  # the best trial's plan (its search info: TRIAL; the caller writes the provenance)
    objective: float
    best_seed: str | None  # the seed whose trial is best, or None if a searched trial won
    seed_objectives: dict[str, float] = field(default_factory=dict)
    trials: int = 0
    study_name: str = ""
    storage: str | None = None


def open_storage(url: str | None):
    """None (in memory), 'journal:PATH' or a path ending in .log/.jsonl (journal file), or an RDB URL."""
    try:  # imported here: optuna and SQLAlchemy take a second to load, and only --solver optuna needs them
        import optuna
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend
    except ImportError as exc:
        raise MissingPackageError("the optuna solver needs optuna: pip install 'optuna>=4'") from exc
    if url is None:
        return None
    try:
        if url.startswith("journal:") or url.endswith((".log", ".jsonl")):
            path = Path(url.removeprefix("journal:"))
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        return _rdb_storage(optuna, url)
    except Exception as exc:  # optuna and SQLAlchemy raise many types for a bad URL
        raise SolverError(f"cannot open Optuna storage {url!r}: {str(exc).splitlines()[0] if str(exc) else exc}; "
                          "use journal:PATH for a file, or a valid sqlite:///, postgresql:// or mysql:// URL") from exc


# What a worker sees when another creates the same new database at that moment: its tables, its schema version row
RACES = ("already exists", "UNIQUE constraint failed", "database is locked", "no such table", "Duplicate entry",
         "duplicate key")


def _rdb_storage(optuna, url: str, attempts: int = 5):
    """optuna's RDBStorage; workers starting together on a new database race to create its tables and to record
    its schema version (one of them fails with "table ... already exists" or a unique-constraint error), so such a
    failed open is retried once the other has made them."""
    for attempt in range(attempts):
        try:
            return optuna.storages.RDBStorage(url)
        except Exception as exc:  # SQLAlchemy's OperationalError / IntegrityError, by driver
            if not any(race in str(exc) for race in RACES) or attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def repair(budgets: Sequence[int], total: int, *, floor: int, cap: int | None) -> list[int]:
    """Rescale to sum exactly to `total` within [floor, cap]; the identity when the sum already matches."""
    if sum(budgets) == total:
        return list(budgets)
    return exact_integer_budgets([float(b) for b in budgets], total, floor=floor, cap=cap)


def search(objective: Callable[[Plan], float], *, info: ModelInfo, average_budget: float, policies: Sequence[str],
           total: int, floor: int = 1, cap: int | None = None, seeds: dict[str, Plan] | None = None,
           n_trials: int = 50, timeout: float | None = None, storage: str | None = None, study_name: str = "polykv",
           seed: int = 0) -> SearchResult:
    """Minimise `objective(plan)` over plans with one registered policy and budget per compressible layer of
    `info`, the budgets summing to `total` exactly. With a `storage`, every worker (process or machine) that calls
    this with the same `study_name` joins the study: the seeds are enqueued once, by whichever comes first (two
    starting at the same instant may both enqueue them), the trials run until the study holds `n_trials` finished
    ones, and each trial records its worker (user attribute "worker": host:pid). Give each worker its own `seed`:
    samplers with the same seed propose the same first trials."""
    import optuna  # imported here: a second to load, only --solver optuna needs it

    layers = info.compressible_layers

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    hi = cap if cap is not None else total
    if floor * len(layers) > total or hi * len(layers) < total:
        raise SolverError(f"total {total} is infeasible for {len(layers)} layers in [{floor}, {hi}] tokens; "
                          f"feasible averages are {floor} to {hi}")
    study = optuna.create_study(storage=open_storage(storage), study_name=study_name, direction="minimize",
                                sampler=optuna.samplers.TPESampler(seed=seed, multivariate=True),
                                load_if_exists=True)
    seeds = seeds or {}
    done = {t.user_attrs.get("seed_name") for t in study.trials}  # evaluated, or enqueued by another worker
    enqueued = [name for name in seeds if name not in done]
    for name, seed_plan in seeds.items():
        if name in done:
            continue  # already evaluated before a restart
        params = {}
        for layer in layers:
            params[f"policy_{layer}"] = seed_plan.layers[layer].policy
            params[f"budget_{layer}"] = int(min(max(seed_plan.layers[layer].budget, floor), hi))
        study.enqueue_trial(params, user_attrs={"seed_name": name})

    worker = f"{socket.gethostname()}:{os.getpid()}"

    def run(trial: optuna.Trial) -> float:
        chosen = [trial.suggest_categorical(f"policy_{layer}", list(policies)) for layer in layers]
        raw = [trial.suggest_int(f"budget_{layer}", floor, hi) for layer in layers]
        fixed = repair(raw, total, floor=floor, cap=cap)
        trial.set_user_attr("budgets", fixed)
        trial.set_user_attr("worker", worker)
        return float(objective(trial_plan(chosen, fixed)))

    def trial_plan(chosen: Sequence[str], budgets: Sequence[int]) -> Plan:
        return Plan.build(info, average_budget=average_budget, search=TRIAL,
                          layers=[LayerPlan.of(layer, name, int(budget))
                                  for layer, name, budget in zip(layers, chosen, budgets)])

    finished = len([t for t in study.trials if t.state.is_finished()])
    limit = max(n_trials, finished + len(enqueued))  # the seeds this worker enqueued are always evaluated
    # n_trials is the study's: a worker stops when the study (every worker's trials) has finished `limit`
    shared = optuna.study.MaxTrialsCallback(limit, states=tuple(s for s in optuna.trial.TrialState
                                                                if s.is_finished()))
    study.optimize(run, n_trials=max(limit - finished, 0), timeout=timeout, gc_after_trial=False,
                   callbacks=[shared])
    best = study.best_trial
    plan = trial_plan([best.params[f"policy_{layer}"] for layer in layers], best.user_attrs["budgets"])
    seed_objectives = {t.user_attrs["seed_name"]: float(t.value) for t in study.trials
                       if t.user_attrs.get("seed_name") and t.value is not None}
    return SearchResult(plan=plan, objective=float(best.value),
                        best_seed=best.user_attrs.get("seed_name"), seed_objectives=seed_objectives,
                        trials=len(study.trials), study_name=study_name, storage=storage)
