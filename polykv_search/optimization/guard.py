"""The guard: per budget, the optimized plan is kept only where it measures at least as well as every uniform policy
on calibration samples (never the evaluation data), each sample answered by the plan optimized without it.

`run` keeps the plan's rung wherever it scores at least as well as every uniform policy on the calibration samples,
and writes the best uniform policy in its place where it does not, so the plan a user gets is never below a single
policy on the data it was made from. Given other optimized ladders too (`run`'s per-head default: the plan with six
candidate policies and the plan with eleven), it first takes the best optimized rung per budget, then holds it to
the same test. Each candidate's measurement is kept in a cache file under the rungs it answered with, written after
every measurement: an interrupted `run` measures again only what it was measuring, and a guard asked about another
candidate set or uniform policy measures only those.

For the trtllm target the uniform candidate is the engine's own window, every rung is graded as TensorRT-LLM runs its
windows, fixed window shapes (optimization/window_shapes.py) stand beside the optimized plan, and a candidate must
also answer closer to the full cache than the engine's window (a lower KL) to be kept, lead it surely on the task, and,
where it is fitted, the rung written for it (optimized on every sample) must pass the same tests on those samples.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

from polykv_search.calibration.profile import Profile
from polykv_search.checkpoints import fingerprint_digest, samples_digest
from polykv_search.data import DataSpec, Sample, resolve_samples
from polykv_search.engine.objective import Measures
from polykv_search.engine.progress import Progress
from polykv_search.errors import ConfigError
from polykv_search.export import TRTLLM
from polykv_search.io import unseal, write_sealed_json
from polykv_search.models import DEFAULT_DEVICE, LoadedModel, ModelSpec, resolve_model
from polykv_search.optimization.choose import Choice
from polykv_search.optimization.crossfit import DEFAULT_FOLDS, fold_plans
from polykv_search.optimization.lead import Lead, paired_lead
from polykv_search.optimization.measure import RungMeasure
from polykv_search.optimization.policy_sets import refuse_sets_end_to_end, set_names
from polykv_search.optimization.run import OptimizeConfig, optimize_profile
from polykv_search.optimization.targets import engine_settings
from polykv_search.optimization.window_shapes import WINDOW_SHAPES, shape_ladders
from polykv_search.plan import Plan, PlanFile, load_plan, uniform_ladders
from polykv_search.plan.names import Metric
from polykv_search.policies import DEFAULT_POLICIES, check_policy_names

logger = logging.getLogger(__name__)

GUARD_CACHE_VERSION = 4  # part of the cache key: bump when what is measured, or how, changes
PLAN = "plan"  # the guard's name for the optimized plan (the other sets' plans: "plan (N policies)")


@dataclass
class GuardRung(Choice):
    """One budget of the guard: `measured` holds every candidate's mean `metric` (a task loss, cross-fitted when
    `reason` says so), `second` its tie-break measure; `chosen` the winner, `reason` why."""

    metric: Metric
    tie_break: Metric
    second: dict[str, float]  # candidate -> the mean `tie_break` measure
    optimized: tuple[str, ...]  # the optimized candidates (the plan, then the other policy sets' plans)
    kept_plan: bool  # the winner is an optimized plan; False: the best uniform policy took its place
    reason: str  # the note written in the rung's search notes
    same_as: str | None = None  # a kept optimized rung that keeps exactly what this uniform candidate keeps
    lead: Lead | None = None  # a kept rung's task-loss lead over the best uniform policy, with its interval


class GuardResult(NamedTuple):
    """What `guard_plan` returns: the guarded plan file, what it measured per budget, and on how many samples."""

    plan_file: PlanFile
    rungs: list[GuardRung]
    samples: int


def guard_rungs(plan_file: PlanFile, uniform: Sequence[tuple[str, PlanFile]],
                measure: Callable[[list[Plan]], list[Measures]], *, metric: Metric = "task",
                tie_break: Metric = "lost", name: str = PLAN, where: str = "on calibration samples",
                alternatives: Sequence[tuple[str, PlanFile]] = (), confirm: bool = False,
                lead: Callable[[float, int, int], Lead | None] | None = None,
                written: Callable[[float, int, int], tuple[Measures, Lead | None] | None] | None = None,
                ) -> tuple[list[Plan], list[GuardRung]]:
    """Per budget of `plan_file`: the best optimized rung, of the plan's and the `alternatives`' (other optimized
    ladders of the same budgets, e.g. with other candidate policies; lowest `metric`, then `tie_break`, then the
    earlier), where its `metric` is at most every uniform candidate's (a tie keeps it), else the uniform rung
    lowest by `metric` then `tie_break`. `measure` gets the rungs in that order: the plan's, the alternatives',
    the uniform ones. Each kept or replaced rung's search notes say what was measured, and `where`; a replaced
    rung is the uniform plan itself (solver "uniform").

    `lead(budget, i, j)`: candidate i's paired task-loss lead over candidate j at that budget (indices in `measure`'s
    order), with its interval. Given it, where the plan's rung passes (its `metric` at most every uniform rung's), an
    alternative takes its place only where it measured lower AND its lead over the plan's rung has a 90% interval
    above 0; a lead within chance leaves the plan's rung (the first set's: `run`'s six policies that keep a head's
    newest tokens) standing. Where the plan's rung fails, the best alternative by the mean is held to the uniform
    rungs as without `lead`: the guard's first test stays that no uniform policy measured better. The alternatives
    are richer candidate sets whose plans, picked by a mean alone, win by noise as often as by signal
    (docs/long-context.md, "The first set stands unless surely beaten"). Without `lead`, or where it gives None,
    the lowest mean wins.

    `confirm` (the trtllm target): an optimized rung is kept only where its `tie_break` measure is also strictly
    below the best uniform rung's (the engine's own setting), besides its `metric` at most that rung's, and, given
    `lead`, its lead over that rung has a 90% interval above 0 (the setting a user of the engine already runs stands
    unless surely beaten); of the rungs that pass, the one lowest by `tie_break` (then `metric`) is kept. Where
    every candidate scores near the floor of a few dozen greedy answers, the task loss alone picks noise; the answer
    distribution (the KL) is what held out there (docs/engines.md, "Tried: smooth window shapes").

    `written(budget, i, j)` (with `confirm`): for an optimized candidate i that is cross-fitted, the measures of the
    rung that would be written for it (optimized on every calibration sample) on those same samples, and its lead over
    candidate j; None where the candidate is not fitted (what was graded is what is written). A fitted candidate that
    passes is kept only where its written rung also passes the same tests there: figures on the samples a rung was
    made from flatter it, so a written rung that fails even there is not the rung the cross-fitted figure graded
    (docs/engines.md, "The rung written is graded too")."""
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
    plans, rungs_out = [], []
    for budget in plan_file.budgets:
        rungs = ([(name, plan_file.plan_for(budget))] + [(n, f.plan_for(budget)) for n, f in alternatives]
                 + [(n, f.plan_for(budget)) for n, f in uniform])
        values = measure([p for _, p in rungs])
        measured = {n: float(v[metric]) for (n, _), v in zip(rungs, values)}

        def order(i: int) -> tuple[float, float]:
            return values[i][metric], values[i][tie_break]

        best = min(range(optimized, len(rungs)), key=order)
        stood = ""  # where an alternative measured lower: why the plan's rung stood, or the alternative's sure lead
        others = ", ".join(f"{n}={v:.4g}" for n, v in measured.items())
        if confirm:
            others += f"; mean {tie_break}: " + ", ".join(f"{n}={v[tie_break]:.4g}" for (n, _), v in zip(rungs, values))
            passing = [i for i in range(optimized) if _no_worse_and_closer(values[i], values[best], metric, tie_break)]
            if lead is not None and passing:  # the engine's own setting stands unless surely beaten on the task
                leads = {i: lead(budget, i, best) for i in passing}
                chance = [i for i, held in leads.items() if not _sure(held)]
                passing = [i for i in passing if i not in chance]
                if chance:
                    stood = "; not kept, their lead within chance: " + "; ".join(
                        f"{rungs[i][0]} ({leads[i].describe()})" for i in chance)
            in_sample = {i: written(budget, i, best) for i in passing} if written is not None else {}
            fails = {i: w for i, w in in_sample.items() if w is not None
                     and not (_no_worse_and_closer(w[0], values[best], metric, tie_break) and _sure(w[1]))}
            if fails:
                passing = [i for i in passing if i not in fails]
                stood += ("; not kept, the rung written for it (optimized on every sample) failing the same tests on "
                          "those samples: " + "; ".join(f"{rungs[i][0]} ({_describe(w, metric, tie_break)})"
                                                        for i, w in fails.items()))
            keep = bool(passing)
            top = min(passing, key=lambda i: (values[i][tie_break], values[i][metric])) if passing else 0
            if keep and in_sample.get(top) is not None:
                stood += (f"; the rung written, on the samples it was optimized on: "
                          f"{_describe(in_sample[top], metric, tie_break)}")
        else:
            top = min(range(optimized), key=order)  # min keeps the earliest of equals
            if lead is not None and top != 0 and order(0)[0] <= values[best][metric]:  # the plan passes; is the
                # lead of an alternative that measured lower sure? (a plan that fails gives way to one that passes)
                leads = {i: lead(budget, i, 0) for i in range(1, optimized) if order(i) < order(0)}
                sure = [i for i, held in leads.items() if _sure(held)]  # None: the mean decides
                if sure:
                    top = min(sure, key=order)
                    stood = f"; its lead sure at 90%: {leads[top].describe()}" if leads[top] is not None else ""
                else:
                    within = leads[top].describe()
                    stood = f"; {rungs[0][0]} stands, {rungs[top][0]}'s lead within chance: {within}"
                    top = 0
            keep = values[top][metric] <= values[best][metric]
        chosen_name, plan = rungs[top] if keep else rungs[best]
        same_as = next((n for n, p in rungs[optimized:] if p.kept_key() == plan.kept_key()), None) if keep else None
        if keep and confirm:
            note = (f"guard: kept {chosen_name}, of the optimized rungs whose mean {metric} is at most and mean "
                    f"{tie_break} below every uniform policy's {where}, the lowest by {tie_break} ({others}){stood}")
        elif keep and top == 0 and stood:
            note = (f"guard: kept {chosen_name}, at most every uniform policy's mean {metric} {where} "
                    f"({others}){stood}")
        elif keep and optimized > 1:
            note = (f"guard: kept {chosen_name}, the best optimized rung by mean {metric} (then {tie_break}), at "
                    f"most every uniform policy's {where} ({others}){stood}")
        elif keep:
            note = f"guard: kept, mean {metric} at most every uniform policy's {where} ({others})"
        else:
            worse = "the optimized plans" if optimized > 1 else "the optimized plan"
            if confirm and stood:
                note = (f"guard: no optimized rung passed every test against uniform {chosen_name} {where} "
                        f"({others}){stood}; this rung is that uniform policy")
            elif confirm:
                note = (f"guard: no optimized rung measured at most uniform {chosen_name}'s mean {metric} and below "
                        f"its mean {tie_break} {where} ({others}){stood}; this rung is that uniform policy")
            else:
                note = (f"guard: {worse} measured worse than uniform {chosen_name} by mean {metric} "
                        f"{where} ({others}){stood}; this rung is that uniform policy")
        if same_as is not None:
            note += f"; it keeps exactly what uniform {same_as} keeps"
        notes = f"{plan.search.notes}; {note}" if plan.search.notes else note
        plans.append(replace(plan, search=replace(plan.search, notes=notes)))
        rungs_out.append(GuardRung(budget=budget, chosen=chosen_name, measured=measured, metric=metric,
                                   tie_break=tie_break,
                                   second={n: float(v[tie_break]) for (n, _), v in zip(rungs, values)},
                                   optimized=tuple(names[:optimized]), kept_plan=keep, reason=note,
                                   same_as=same_as))
    return plans, rungs_out


def _no_worse_and_closer(measures: Measures, engine: Measures, metric: Metric, tie_break: Metric) -> bool:
    """`confirm`'s tests on the means: `metric` at most the engine setting's, `tie_break` strictly below it."""
    return measures[metric] <= engine[metric] and measures[tie_break] < engine[tie_break]


def _sure(lead: Lead | None) -> bool:
    """A lead whose 90% interval lies above 0; None (no per-sample losses): the means alone decide."""
    return lead is None or lead.low > 0


def _describe(held: tuple[Measures, Lead | None], metric: Metric, tie_break: Metric) -> str:
    """A written rung's measures and lead, as the rung's notes give them."""
    measures, ahead = held
    return (f"mean {metric} {measures[metric]:.4g}, {tie_break} {measures[tie_break]:.4g}"
            + (f", {ahead.describe()}" if ahead is not None else ""))


def guard_plan(model: ModelSpec, plan_file: PlanFile | str | Path, samples: DataSpec, *,
               policies: Sequence[str] | None = None, profile: Profile | str | Path | None = None,
               config: OptimizeConfig | None = None, policy_sets: Sequence[Sequence[str]] = (),
               crossfit: bool = True, folds: int = DEFAULT_FOLDS, cache: str | Path | None = None,
               device: str = DEFAULT_DEVICE, dtype: str = "auto", max_context_tokens: int | None = None,
               window_shapes: Sequence[str] = WINDOW_SHAPES, progress: Progress | None = None) -> GuardResult:
    """Per budget, the plan's rung where its task score on `samples` (calibration data, never the evaluation
    set) is at least every uniform policy's in `policies`, else the best of those policies (ties by the share
    of the output lost). Returns the guarded plan file, what was measured per budget, and the samples scored.
    `policies` default: every registered policy, or, for a `config` with an engine target (trtllm, duo-attention),
    the settings that engine runs without a plan (optimization/targets.py ENGINE_SETTINGS), the only ones it may
    take the plan's place.

    With the `profile` and `config` the plan was optimized from, the guard cross-fits (`run` does; `crossfit`
    False measures in-sample): each sample is answered by the plan optimized without its fold of the samples
    (`folds`, tasks spread over them; optimization/crossfit.py), so a plan that only fits its own calibration
    samples is not kept. Without them, the plan is measured on samples it may have been made from. `policy_sets`
    (with `profile` and `config`): also the ladders optimized from the profile with the candidates restricted to
    each set, measured the same way; per budget the best optimized rung stands for the plan (`run`'s per-head
    default: the plan of six policies, then that of eleven). `cache`: a JSON file keeping each candidate's
    measurement, reused for the same rungs on the same model and samples (written after every measurement: an
    interrupted `run` does not measure again what it measured).
    `max_context_tokens`: prompts truncated (middle) to this many tokens, as calibrate and evaluate do.

    For the trtllm target every rung is graded as TensorRT-LLM computes its windows, the ladders of `window_shapes`
    (optimization/window_shapes.py: fixed shapes of the engine window's total, nothing fitted to the samples, so not
    cross-fitted) are candidates beside the optimized plan, and a candidate is kept only where it is at most the
    engine's window by task loss and below it by KL and leads it surely on the task, the lowest KL of those winning
    (`guard_rungs`' `confirm`); a cross-fitted candidate must pass the same tests with the rung written for it (the
    plan optimized on every sample) on those samples (`guard_rungs`' `written`), measured unless its fold plans
    already are that rung."""
    plan_file = load_plan(plan_file) if isinstance(plan_file, (str, Path)) else plan_file
    engine = engine_settings(config.target) if config is not None else []
    policies = check_policy_names(list(policies)) if policies is not None else engine or list(DEFAULT_POLICIES)
    beyond = [p for p in policies if engine and p not in engine]
    if beyond:  # only an engine target has settings, so config is given
        raise ConfigError(f"--target {config.target} runs {', '.join(engine)} without a plan: the guard's uniform "
                          f"{', '.join(beyond)} is no setting of that engine; leave the policies to the target")
    if (profile is None) != (config is None):
        raise ConfigError("the guard cross-fits from the profile and the optimize config the plan was made with: "
                          "pass both, or neither to measure the plan as it is")
    if policy_sets and profile is None:
        raise ConfigError("the guard optimizes the plans of other policy sets from the profile: pass the profile "
                          "and the optimize config with policy_sets")
    if policy_sets and config is not None:
        refuse_sets_end_to_end(config)
    lm = resolve_model(model, device=device, dtype=dtype)
    plan_file.check_model(lm.info)
    alternatives: list[tuple[str, PlanFile, OptimizeConfig]] = []
    if profile is not None and config is not None:
        profile = Profile.load(profile) if isinstance(profile, (str, Path)) else profile
        profile.check_model(lm.info)
        if profile.meta.question_aware != plan_file.question_aware:
            raise ConfigError(f"the plan is {plan_file.setting} but the profile was calibrated "
                              f"{setting_name(profile.meta.question_aware)}; guard a plan with the profile it was "
                              "optimized from")
        config = config.validated()
        signature = plan_file.plans[0].search.profile_signature if plan_file.plans else None  # the same profile
        for name, chosen in set_names(policy_sets):
            alt_config = replace(config, policies=tuple(chosen)).validated()
            alternatives.append((name, optimize_profile(profile, plan_file.budgets, config=alt_config,
                                                        profile_signature=signature), alt_config))
    fold_of: dict[str, int] = {}
    fold_files: list[list[PlanFile]] = []  # per optimized ladder (the plan, then the alternatives): one per fold
    if crossfit and profile is not None and config is not None:
        for ladder_config in [config, *(c for _, _, c in alternatives)]:
            fold_of, files = fold_plans(profile, plan_file.budgets, config=ladder_config, folds=folds)
            fold_files.append(files)
    where = (f"on calibration samples, each answered by the plan optimized without its fold ({folds} folds)"
             if fold_files else "on calibration samples")
    windowed = config is not None and config.target == TRTLLM  # graded as TensorRT-LLM computes its windows
    if windowed:
        where += ", every rung run as TensorRT-LLM runs its windows (in the prefill too)"
    uniform = uniform_ladders(lm.info, policies, plan_file.budgets, question_aware=plan_file.question_aware)
    others = [(name, f) for name, f, _ in alternatives]  # cross-fitted: fold_files holds their folds, in this order
    if windowed:
        others += shape_ladders(lm.info, plan_file.budgets, window_shapes, question_aware=plan_file.question_aware)
    loaded, _ = resolve_samples(samples)
    key = _cache_key(lm, loaded, fold_of, max_context_tokens, windowed, plan_file.question_aware)
    stored = read_guard_cache(cache, key)
    entries: dict[str, Measures] = dict(stored["entries"]) if stored else {}
    per_sample: dict[str, dict[str, float]] = _per_sample(stored)  # candidate -> sample id -> task loss
    samples_scored = stored["samples"] if stored else 0
    task_of = {str(s.id): s.task for s in loaded}
    keys_at: dict[float, list[str]] = {}  # budget -> each candidate's key, in the order guard_rungs measures them
    ladders = [plan_file, *(f for _, f in others), *(f for files in fold_files for f in files)]
    measurer: RungMeasure | None = None  # built (every sample prefilled) only when something is not in the cache

    def fill(keys: list[str], plans: list[Plan], for_sample: Callable[[Sample], list[Plan]], *,
             extra: bool = False) -> None:
        """Measure the candidates whose key the cache lacks (`for_sample`: what each sample answers with); `extra`:
        a measurement beyond the one per budget that the progress counts on (a written rung)."""
        nonlocal measurer, samples_scored
        missing = [i for i, k in enumerate(keys) if k not in entries or k not in per_sample]  # both, or again
        if not missing:
            return
        if measurer is None:
            measurer = RungMeasure(lm, loaded, ladders + [f for _, f in uniform], metric="task", stage="guard",
                                   budgets=len(plan_file.budgets), progress=progress,
                                   max_context_tokens=max_context_tokens, windowed=windowed)
        if extra:
            measurer.steps += 1
        each = measurer.each([plans[i] for i in missing], lambda s: [for_sample(s)[i] for i in missing])
        for i, pairs in zip(missing, each):  # the mean as RungMeasure's call gives it
            entries[keys[i]] = measurer.objective.means([[m] for _, m in pairs], 1)[0]
            per_sample[keys[i]] = {str(s.id): float(m["task"]) for s, m in pairs}  # by _id, as reports name them
        samples_scored = measurer.samples
        if cache is not None:  # after every measurement: an interrupted guard keeps what it measured
            write_sealed_json(cache, {"run": key, "samples": samples_scored, "entries": entries,
                                      "per_sample": per_sample})

    def measure(plans: list[Plan]) -> list[Measures]:
        budget = plans[0].average_budget

        def for_sample(sample: Sample) -> list[Plan]:
            fold = fold_of.get(sample.id)  # a sample the profile does not hold never shaped the plan
            if fold is None or not fold_files:
                return plans
            return [files[fold].plan_for(budget) for files in fold_files] + plans[len(fold_files):]

        # what each candidate answers with: its rung, and its rung in every fold when cross-fitted
        keys = [_rungs_key([plan, *(f.plan_for(budget) for f in (fold_files[i] if i < len(fold_files) else ()))])
                for i, plan in enumerate(plans)]
        keys_at[budget] = keys
        fill(keys, plans, for_sample)
        return [entries[k] for k in keys]

    fitted = [plan_file, *(f for _, f, _ in alternatives)][:len(fold_files)]  # the cross-fitted ladders, in order

    def written_at(budget: float, i: int, j: int) -> tuple[Measures, Lead | None] | None:
        """Candidate i's written rung measured on every calibration sample (it answers each one itself, as an
        unfitted candidate does), and its lead over candidate j; None for a candidate that is not fitted."""
        if i >= len(fitted):
            return None
        rung = fitted[i].plan_for(budget)
        if all(f.plan_for(budget).kept_key() == rung.kept_key() for f in fold_files[i]):
            return None  # every fold plan is the written rung: the cross-fitted figures are already its own
        keys = [_rungs_key([rung])]
        fill(keys, [rung], lambda _: [rung], extra=True)
        other = per_sample.get(keys_at[budget][j])
        ahead = paired_lead(per_sample[keys[0]], other, task_of, over=names[j]) if other else None
        return entries[keys[0]], ahead

    names = [PLAN, *(n for n, _ in others), *(n for n, _ in uniform)]  # guard_rungs' candidate order

    def lead_at(budget: float, i: int, j: int) -> Lead | None:
        """Candidate i's paired task-loss lead over candidate j at `budget`, from the per-sample losses."""
        keys = keys_at.get(budget, [])
        kept, other = (per_sample.get(keys[i]), per_sample.get(keys[j])) if max(i, j) < len(keys) else (None, None)
        return paired_lead(kept, other, task_of, over=names[j]) if kept and other else None

    plans, rungs = guard_rungs(plan_file, uniform, measure, where=where, alternatives=others,
                               tie_break="kl" if windowed else "lost", confirm=windowed, lead=lead_at,
                               written=written_at if windowed else None)
    for j, rung in enumerate(rungs):
        lead = _lead(rung, names, lead_at) if rung.kept_plan else None
        if lead is not None:
            rungs[j] = replace(rung, lead=lead)
            plan = plans[j]
            plans[j] = replace(plan, search=replace(plan.search, notes=f"{plan.search.notes}; {lead.describe()}"))
    return GuardResult(replace(plan_file, plans=tuple(plans), schema_version=""), rungs, samples_scored)


def _lead(rung: GuardRung, names: Sequence[str], lead_at: Callable[[float, int, int], Lead | None]) -> Lead | None:
    """The kept rung's lead over the uniform policy it had to beat (lowest by the metric, then the tie-break, as
    guard_rungs picks it); None where the per-sample losses are missing."""
    uniform = [n for n in names if n not in rung.optimized]
    if not uniform:
        return None
    over = min(uniform, key=lambda n: (rung.measured[n], rung.second[n]))
    return lead_at(rung.budget, names.index(rung.chosen), names.index(over))


def _per_sample(stored: dict | None) -> dict[str, dict[str, float]]:
    """The stored per-sample task losses, where a cache holds them in the expected shape (a cache written before
    they were kept has none: its candidates are measured again, since the guard's choices need them)."""
    held = stored.get("per_sample") if stored else None
    if not isinstance(held, dict):
        return {}
    return {k: {s: float(v) for s, v in losses.items()} for k, losses in held.items()
            if isinstance(losses, dict) and all(isinstance(v, (int, float)) for v in losses.values())}


def _cache_key(lm: LoadedModel, samples: Sequence[Sample], fold_of: dict[str, int], max_context_tokens: int | None,
               windowed: bool, question_aware: bool) -> str:
    """What every measurement depends on beside the rungs answered with: the model, the samples and each sample's
    fold, how prompts are cut, formed and answered. The cache keeps each candidate's measurement under its rungs,
    so a guard asked about other sets or policies measures only what it has not measured."""
    return fingerprint_digest({"model": lm.info.model_id, "revision": lm.info.revision,
                               "dtype": str(getattr(lm.model, "dtype", "")), "device": str(lm.device),
                               "folds": [fold_of.get(s.id) for s in samples],  # what each sample answers with
                               "samples": samples_digest(samples), "guard": GUARD_CACHE_VERSION,
                               **({"question_aware": True} if question_aware else {}),
                               **({"max_context": max_context_tokens} if max_context_tokens else {}),
                               **({"windowed": True} if windowed else {})})


def _rungs_key(rungs: Sequence[Plan]) -> str:
    """A candidate's identity in the cache: what its rungs answer with, not how long their solves took."""
    return fingerprint_digest([[rung.average_budget, rung.to_dict()["layers"]] for rung in rungs])


def read_guard_cache(path: str | Path | None, key: str) -> dict | None:
    """The guard's stored measurements (`entries`: each candidate's under its rungs' key, and `samples`) when `path`
    holds them for `key` in the expected shape; else None (the guard measures again: the file is a cache, never the
    only copy of anything)."""
    if path is None or not Path(path).is_file():
        return None
    try:
        stored = unseal(json.loads(Path(path).read_text()))  # its checksum: a damaged cache is never replayed
        entries = stored["entries"]
        ok = (stored["run"] == key and isinstance(stored["samples"], int) and isinstance(entries, dict)
              and all(isinstance(m.get("task"), (int, float)) and isinstance(m.get("lost"), (int, float))
                      for m in entries.values()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        logger.warning("guard cache %s is damaged (%s); measuring again", path, exc)
        return None
    return stored if ok else None
