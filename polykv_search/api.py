"""The library API: each stage of the pipeline as one call, typed and keyword-only, returning objects and printing
nothing (progress goes to an optional callback; the command line is a skin over these functions).

    import polykv_search as pk

    run = pk.calibrate("smollm2-135m", "calibration_data/calib.jsonl", out_dir="outputs/smol")
    plans = pk.optimize(run.profile, budgets=[128, 256], config=pk.OptimizeConfig(solver="ilp"))
    plans.save("outputs/smol/plan.json")
    report = pk.evaluate("smollm2-135m", "calibration_data/eval.jsonl", plans={"plan": plans})
    print(report.recovery_of("plan"))

A model is an embedded alias, a .gguf file, a local folder, a hub id, or a `LoadedModel` (loaded once with
`load_model` and passed to several calls); data is a file, a folder, a hub id, a list of them, or a list of
`Sample`s.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from polykv_search.calibration import CalibrationConfig, CalibrationRun, Profile, calibrate_model
from polykv_search.calibration.budgets import HEAD_BUDGETS
from polykv_search.calibration.profile import HEAD_COST_KINDS, HEAD_FISHER, HEAD_KL, OPTIONAL_COST_KINDS
from polykv_search.calibration.figures import signal_heatmap
from polykv_search.calibration.shards import Shard
from polykv_search.checkpoints import fingerprint_digest, folder_lock, samples_digest
from polykv_search.data import Sample, load_samples, spread_over_tasks
from polykv_search.engine import EndToEndObjective
from polykv_search.errors import ConfigError
from polykv_search.evaluation import ALLOCATORS, Report, build_methods, check_allocators, score_methods, summarize
from polykv_search.io import file_sha256, unseal, write_sealed_json
from polykv_search.models import DEFAULT_MODEL, LoadedModel, load_model, model_slug
from polykv_search.optimization.choose import Choice, choose_rungs, guard_rungs
from polykv_search.optimization.crossfit import DEFAULT_FOLDS, crossfit_obstacle, fold_plans
from polykv_search.optimization.figures import allocation_png
from polykv_search.optimization.proxy import ProxyReport
from polykv_search.optimization.proxy import check_proxy as proxy_check
from polykv_search.optimization.run import OptimizeConfig, check_budgets, optimize_profile
from polykv_search.plan import Plan, PlanFile, load_plan, uniform_plan
from polykv_search.policies import DEFAULT_POLICIES, PER_HEAD_POLICIES, PER_HEAD_POLICY_SETS, check_policy_names

logger = logging.getLogger(__name__)

CALIBRATION_DATA = "calibration_data/calib.jsonl"
EVALUATION_DATA = "calibration_data/eval.jsonl"

ModelSpec = str | Path | LoadedModel
DataSpec = str | Path | Sequence[str | Path] | Sequence[Sample]
Progress = Callable[[str, int, int, str], None]  # (stage, done, total, note): how far a long call has come


@dataclass
class RunResult:
    """What `run` wrote and measured: the profile, the plan file, the evaluation report, and where each is."""

    out_dir: Path
    calibration: CalibrationRun
    plan_file: PlanFile  # the plan as written: each rung the optimized one or, where the guard replaced it, uniform
    plan_path: Path
    report: Report  # report.files: where its json, markdown and png are
    guard: list[Choice] = field(default_factory=list)  # per budget, what the guard measured and kept (none: off)
    guard_samples: int = 0


@dataclass
class ChooseResult:
    """The ladder `choose` kept, what it measured per budget, and on how many calibration samples."""

    plan_file: PlanFile
    choices: list[Choice]
    samples: int


def default_out_dir(model: ModelSpec) -> Path:
    """outputs/<model>: where the commands write a model's profile, plan and report unless told otherwise."""
    return Path("outputs") / model_slug(model.info.model_id if isinstance(model, LoadedModel) else model)


def resolve_model(model: ModelSpec, *, device: str = "cpu", dtype: str = "auto", trust_remote_code: bool = False,
                  revision: str | None = None) -> LoadedModel:
    """A loaded model: `model` itself, or the spec loaded with these options."""
    if isinstance(model, LoadedModel):
        return model
    return load_model(str(model), device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                      revision=revision)


def resolve_samples(data: DataSpec, *, max_samples: int | None = None,
                    column_map: Mapping[str, str] | None = None) -> tuple[list[Sample], list[str]]:
    """(samples, the sources they came from): at most `max_samples`, taken in turn from each task."""
    if max_samples is not None and max_samples < 1:
        raise ConfigError(f"max_samples {max_samples} must be at least 1; leave it out (None) to use every sample")
    items = [data] if isinstance(data, (str, Path)) else list(data)
    if items and all(isinstance(item, Sample) for item in items):
        return spread_over_tasks(items, max_samples), []
    if not items or not all(isinstance(item, (str, Path)) for item in items):
        raise ConfigError("data must be a file, folder or hub id, a list of them, or a list of Samples")
    samples = [s for source in items for s in load_samples(source, column_map=column_map)]
    return spread_over_tasks(samples, max_samples), [str(source) for source in items]


def calibrate(model: ModelSpec = DEFAULT_MODEL, data: DataSpec = CALIBRATION_DATA, *,
              config: CalibrationConfig = CalibrationConfig(), out_dir: str | Path | None = None,
              max_samples: int | None = None, column_map: Mapping[str, str] | None = None, resume: bool = False,
              device: str = "cpu", dtype: str = "auto", trust_remote_code: bool = False, revision: str | None = None,
              progress: Progress | None = None, shard: Shard | tuple[int, int] | str | None = None,
              ) -> CalibrationRun:
    """Measure per-layer signals and every policy's cost at every budget of the grid on calibration samples;
    writes `out_dir/profile.safetensors` (default outputs/<model>/) and per-sample checkpoints (`resume` goes on
    from them). The returned run holds the profile. `shard` (K, N) or "K/N": only every N-th sample of the
    selection, from the K-th (1-based), into `out_dir/shard-K-of-N/`; `merge_profiles` joins the N profiles."""
    config = config.validated()
    samples, sources = resolve_samples(data, max_samples=max_samples, column_map=column_map)
    out = Path(out_dir) if out_dir is not None else default_out_dir(model)
    if shard is not None:
        shard = Shard.of(shard)
        out = out / shard.name  # a folder (and a lock) per shard: shards sharing --out never meet
        shard.select(samples)  # an empty shard is refused before the model loads
    with folder_lock(out):  # a second run on the folder is refused before the model loads
        lm = resolve_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                           revision=revision)
        step = None
        if progress:
            def step(result) -> None:
                note = f"skipped: {result.skipped}" if result.skipped else \
                    f"{result.task} ({result.context_tokens} tok)"
                progress("calibrate", result.index + 1, len(shard.positions(len(samples))) if shard else
                         len(samples), note)
        return calibrate_model(lm, samples, config=config, data_sources=sources, out_dir=out, resume=resume,
                               progress=step, shard=shard)


def optimize(profile: Profile | str | Path, *, budgets: float | Sequence[float],
             config: OptimizeConfig = OptimizeConfig(), model: ModelSpec | None = None, data: DataSpec | None = None,
             max_samples: int | None = None, device: str = "cpu", dtype: str = "auto",
             progress: Progress | None = None) -> PlanFile:
    """One plan per average budget (tokens per compressible layer) from a profile: a ladder, returned unsaved
    (`PlanFile.save` writes it). The end-to-end solvers (select, optuna) measure plans on calibration samples:
    `model` (default: the profile's) and `data` (default: the profile's calibration data)."""
    config = config.validated()
    budgets = check_budgets(budgets)
    signature = None
    if not isinstance(profile, Profile):
        signature = file_sha256(profile) if Path(profile).is_file() else None
        profile = Profile.load(profile)
    objective = None
    if config.end_to_end:
        lm = resolve_model(model if model is not None else profile.model.model_id, device=device, dtype=dtype)
        profile.check_model(lm.info)
        sources = data if data is not None else [e["source"] for e in profile.header.get("data", [])] or \
            CALIBRATION_DATA
        samples, _ = resolve_samples(sources, max_samples=max_samples)
        if progress:
            progress("optimize", 0, len(samples), f"prefilling {len(samples)} calibration samples")
        objective = EndToEndObjective(lm, samples, policies=profile.policies, metric=config.metric)
    message = (lambda text: progress("optimize", 0, 0, text)) if progress else None
    return optimize_profile(profile, budgets, config=config, objective=objective, profile_signature=signature,
                            progress=message)


def evaluate(model: ModelSpec = DEFAULT_MODEL, data: DataSpec = EVALUATION_DATA, *,
             plans: Mapping[str, PlanFile | str | Path] | Sequence[str | Path] = (),
             budgets: Sequence[float] | None = None, policies: Sequence[str] | None = None,
             allocators: Sequence[str] = ALLOCATORS, allocator_policy: str = "snapkv",
             profile: Profile | str | Path | None = None, out_dir: str | Path | None = None,
             max_samples: int | None = None, max_context_tokens: int | None = None, with_kl: bool = True,
             batch_size: int = 16, column_map: Mapping[str, str] | None = None, resume: bool = False,
             device: str = "cpu", dtype: str = "auto", trust_remote_code: bool = False, revision: str | None = None,
             progress: Progress | None = None) -> Report:
    """Answer held-out samples with the full cache, every uniform policy, PyramidKV and CAKE (CAKE needs a
    `profile`) and Ada-KV (`allocators`) at each budget, and the given plans at their own budgets; score each
    answer by its task's metric; gap recovery R per budget. `plans`: name -> plan file (or paths, named by their
    stem). `budgets` default: the plans' budgets, else 64, 128, 256, 512; plan rungs at other budgets are left
    out. Writes the checkpoints and the report (json, md, png) under `out_dir` (default outputs/<model>/eval)."""
    named = _named_plans(plans)
    if budgets is not None:
        grid = check_budgets(budgets)
        named = [(name, _only_budgets(name, plan_file, grid)) for name, plan_file in named]
    else:
        grid = sorted({p.average_budget for _, f in named for p in f.plans}) or [64, 128, 256, 512]
    uniform = check_policy_names(list(policies)) if policies else list(DEFAULT_POLICIES)
    check_policy_names([allocator_policy])
    allocators = check_allocators(allocators)
    samples, sources = resolve_samples(data, max_samples=max_samples, column_map=column_map)
    loaded_profile = Profile.load(profile) if isinstance(profile, (str, Path)) else profile
    out = Path(out_dir) if out_dir is not None else default_out_dir(model) / "eval"
    with folder_lock(out):  # a second run on the folder is refused before the model loads
        lm = resolve_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                           revision=revision)
        for _, plan_file in named:
            plan_file.check_model(lm.info)
        if loaded_profile is not None:
            loaded_profile.check_model(lm.info)
        methods = build_methods(lm.info, budgets=grid, uniform_policies=uniform, allocators=allocators,
                                allocator_policy=allocator_policy, profile=loaded_profile, plans=named)
        step = (lambda done, total: progress("evaluate", done, total, f"{len(methods) + 1} methods per sample")) \
            if progress else None
        results = score_methods(lm, samples, methods, out_dir=out, resume=resume, with_kl=with_kl,
                                batch_size=batch_size, max_context_tokens=max_context_tokens, progress=step)
        report = summarize(results, methods, kv_slots=len(lm.info.compressible_layers) * lm.info.num_kv_heads)
        title = f"{lm.info.model_id} on {', '.join(Path(s).name for s in sources) or f'{len(samples)} samples'}"
        report.save(out, title=title)
        return report


def run(model: ModelSpec = DEFAULT_MODEL, *, budgets: float | Sequence[float] = 128,
        calib: DataSpec = CALIBRATION_DATA, eval_data: DataSpec = EVALUATION_DATA,
        policies: Sequence[str] | None = None, policy_sets: Sequence[Sequence[str]] | None = None,
        grid: Sequence[int] | None = None, compare: Sequence[str] | None = None,
        allocators: Sequence[str] = ALLOCATORS, config: OptimizeConfig = OptimizeConfig(cost=HEAD_FISHER),
        max_calib_samples: int | None = None,
        max_eval_samples: int | None = None, out_dir: str | Path | None = None, fresh: bool = False,
        guard: bool = True, device: str = "cpu", dtype: str = "auto",
        progress: Progress | None = None) -> RunResult:
    """The whole job on one model: calibrate on `calib`, optimize a plan per budget, evaluate it on the held-out
    `eval_data` against the full cache, the uniform policies and the `allocators` (PyramidKV, CAKE and Ada-KV
    by default; checked before any work). Everything goes under `out_dir` (default outputs/<model>/); an
    interrupted run resumes where it stopped (`fresh`: start over, discarding the folder's checkpoints).

    `config.cost` decides the calibrate mode. The default, head_fisher, plans a policy and budget per KV head from
    one `calibrate --head-fisher` (on the grid HEAD_BUDGETS) of every policy of `policy_sets`, then a plan per
    set (default PER_HEAD_POLICY_SETS: six policies that keep a head's newest tokens, and those six with five
    scorers alone; `policies` or `config.policies` alone: that one set), and the guard keeps per budget the set
    whose plan measures best (plan_optimized.json holds the first set's ladder);
    head_kl does the same from the probes (slower); layer_kl / layer_nll calibrate with `layer_kl`, around_kl
    around the budgets themselves, mass_lost and out_err need no extra mode (per-layer candidates default to
    every registered policy). The end-to-end solvers (select, optuna) measure on every sample of `calib`.
    `guard` (the default): per budget, the optimized rung is kept only where its task score on the `calib`
    samples is at least that of every uniform policy in `compare`, else the best of them takes its place and the
    rung's notes say so (the optimized ladder is kept as plan_optimized.json); each sample is answered by the plan
    optimized without its half of the samples (`guard_plan`'s cross-fitting; the end-to-end solvers, which
    measure on every sample, and a single calibration sample are guarded in-sample). `compare` (default: every
    registered policy) is also the uniform policies the evaluation scores. Without the guard the plan is the first
    set's."""
    config = config.validated()
    budgets = check_budgets(budgets)
    policies, policy_sets = candidate_sets(config, policies, policy_sets, guard=guard)
    resolve_samples(eval_data, max_samples=max_eval_samples)  # a bad held-out set is refused before any work
    allocators = check_allocators(allocators)
    out = Path(out_dir) if out_dir is not None else default_out_dir(model)
    with folder_lock(out):  # a second run on the folder is refused before the model loads
        return _run_locked(model, budgets=budgets, calib=calib, eval_data=eval_data, policies=policies,
                           policy_sets=policy_sets, grid=grid,
                           compare=check_policy_names(list(compare)) if compare else list(DEFAULT_POLICIES),
                           allocators=allocators, config=config, max_calib_samples=max_calib_samples,
                           max_eval_samples=max_eval_samples, out=out, fresh=fresh, guard=guard, device=device,
                           dtype=dtype, progress=progress)


def candidate_sets(config: OptimizeConfig, policies: Sequence[str] | None,
                   policy_sets: Sequence[Sequence[str]] | None, *, guard: bool = True
                   ) -> tuple[list[str] | None, list[list[str]]]:
    """(the policies `run` calibrates, None for the mode's default; the candidate sets its guard chooses between,
    empty for one plan). `--cost head_fisher` defaults to PER_HEAD_POLICY_SETS when no candidates are given at all
    (with the guard off, to the first set alone). Every set must be among the calibrated policies and name every
    policy `--only` restricts; ConfigError otherwise."""
    if policy_sets is None:
        defaults = config.cost == HEAD_FISHER and policies is None and config.policies is None
        policy_sets = (PER_HEAD_POLICY_SETS if guard else PER_HEAD_POLICY_SETS[:1]) if defaults else ()
    elif len(policy_sets) > 1 and not guard:
        raise ConfigError("several policy sets need the guard to choose between their plans; give one set, or drop "
                          "--no-guard")
    sets = [check_policy_names(list(chosen)) for chosen in policy_sets]
    if not sets:
        return (check_policy_names(list(policies)) if policies else None), []
    if config.policies is not None:
        raise ConfigError("give the plan's candidate policies either as policy sets or as the optimize config's "
                          "policies, not both")
    refuse_sets_end_to_end(config)
    seen = [frozenset(chosen) for chosen in sets]
    if len(set(seen)) != len(seen):
        raise ConfigError(f"policy sets {' and '.join(','.join(c) for c in sets if seen.count(frozenset(c)) > 1)} "
                          "are the same set; give each once")
    calibrated = check_policy_names(list(policies)) if policies else list(dict.fromkeys(p for s in sets for p in s))
    for chosen in sets:
        missing = [p for p in chosen if p not in calibrated]
        if missing:
            raise ConfigError(f"policy set {','.join(chosen)} names {', '.join(missing)}, which --policies does not "
                              f"calibrate ({', '.join(calibrated)}); add them to --policies")
        restricted = [p for p in config.allowed or {} if p not in chosen]
        if restricted:
            raise ConfigError(f"--only restricts {', '.join(restricted)}, which policy set {','.join(chosen)} does "
                              "not hold; add it to every set or drop that --only")
    return calibrated, sets


def refuse_sets_end_to_end(config: OptimizeConfig) -> None:
    """ConfigError when `config`'s solver measures plans end to end: policy sets are plans solved from the profile."""
    if config.end_to_end:
        raise ConfigError(f"--solver {config.solver} measures its plans end to end; policy sets are for the "
                          "solvers that optimize from the profile (dp, ilp)")


def _run_locked(model: ModelSpec, *, budgets: list[float], calib: DataSpec, eval_data: DataSpec,
                policies: Sequence[str] | None, policy_sets: list[list[str]], grid: Sequence[int] | None,
                compare: list[str],
                allocators: list[str], config: OptimizeConfig, max_calib_samples: int | None,
                max_eval_samples: int | None, out: Path, fresh: bool, guard: bool, device: str, dtype: str,
                progress: Progress | None) -> RunResult:
    lm = resolve_model(model, device=device, dtype=dtype)
    around = ()
    if config.cost == "around_kl":
        if any(not float(b).is_integer() for b in budgets):
            raise ConfigError(f"--cost around_kl measures whole-token operating points; --budget {budgets} has a "
                              "fraction: use whole numbers of tokens per layer")
        around = tuple(int(b) for b in budgets)
    per_head = config.cost in HEAD_COST_KINDS
    calibration_config = CalibrationConfig(policies=tuple(policies) if policies else
                                           PER_HEAD_POLICIES if per_head else DEFAULT_POLICIES,
                                           budgets=tuple(grid) if grid else HEAD_BUDGETS if per_head else
                                           CalibrationConfig().budgets,
                                           layer_kl=config.cost in OPTIONAL_COST_KINDS,
                                           head_kl=config.cost == HEAD_KL, head_fisher=config.cost == HEAD_FISHER,
                                           around=around)
    calibration = calibrate(lm, calib, config=calibration_config, out_dir=out, max_samples=max_calib_samples,
                            resume=not fresh, progress=progress)
    signal_heatmap(calibration.profile, out / "signals.png")
    if policy_sets:  # the plan of the first set; the guard weighs the others' against it per budget
        config = replace(config, policies=tuple(policy_sets[0]))
    plan_file = optimize(calibration.path, budgets=budgets, config=config, model=lm, data=calib, progress=progress)
    choices, guard_samples = [], 0
    if guard:
        plan_file.save(out / "plan_optimized.json")
        samples, _ = resolve_samples(calib, max_samples=max_calib_samples)
        if fresh:
            (out / "guard.json").unlink(missing_ok=True)
        obstacle = crossfit_obstacle(calibration.profile, config)
        if obstacle:  # e.g. one calibration sample, or a solver that measures on every sample
            logger.info("guard: the %s measured on the calibration samples %s made from (%s)",
                        "plans are" if len(policy_sets) > 1 else "plan is",
                        "they were" if len(policy_sets) > 1 else "it was", obstacle)
        from_profile = ({"profile": calibration.profile, "config": config, "policy_sets": policy_sets[1:]}
                        if not obstacle or policy_sets else {})
        plan_file, choices, guard_samples = guard_plan(lm, plan_file, samples, policies=compare, progress=progress,
                                                       cache=out / "guard.json", crossfit=not obstacle,
                                                       **from_profile)
    plan_path = plan_file.save(out / "plan.json")
    allocation_png(plan_file, out / "plan.png")
    report = evaluate(lm, eval_data, plans={"plan": plan_file}, budgets=budgets, policies=compare,
                      allocators=allocators, profile=calibration.profile, out_dir=out / "eval",
                      max_samples=max_eval_samples, resume=not fresh, progress=progress)
    return RunResult(out_dir=out, calibration=calibration, plan_file=plan_file, plan_path=plan_path, report=report,
                     guard=choices, guard_samples=guard_samples)


def guard_plan(model: ModelSpec, plan_file: PlanFile | str | Path, samples: DataSpec, *,
               policies: Sequence[str] = DEFAULT_POLICIES, profile: Profile | str | Path | None = None,
               config: OptimizeConfig | None = None, policy_sets: Sequence[Sequence[str]] = (),
               crossfit: bool = True, folds: int = DEFAULT_FOLDS, cache: str | Path | None = None,
               device: str = "cpu", dtype: str = "auto",
               progress: Progress | None = None) -> tuple[PlanFile, list[Choice], int]:
    """Per budget, the plan's rung where its task score on `samples` (calibration data, never the evaluation
    set) is at least every uniform policy's in `policies`, else the best of those policies (ties by the share
    of the output lost). Returns the guarded plan file, what was measured per budget, and the samples scored.

    With the `profile` and `config` the plan was optimized from, the guard cross-fits (`run` does; `crossfit`
    False measures in-sample): each sample is answered by the plan optimized without its fold of the samples
    (`folds`, tasks spread over them; optimization/crossfit.py), so a plan that only fits its own calibration
    samples is not kept. Without them, the plan is measured on samples it may have been made from. `policy_sets`
    (with `profile` and `config`): also the ladders optimized from the profile with the candidates restricted to
    each set, measured the same way; per budget the best optimized rung stands for the plan (`run`'s per-head
    default: the plan of six policies, then that of eleven). `cache`: a JSON file keeping the measurements, reused
    when the model, plans, samples and policies are the same (an interrupted `run` does not measure again)."""
    plan_file = load_plan(plan_file) if isinstance(plan_file, (str, Path)) else plan_file
    policies = check_policy_names(list(policies))
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
    alternatives: list[tuple[str, PlanFile, OptimizeConfig | None]] = []
    if profile is not None and config is not None:
        profile = Profile.load(profile) if isinstance(profile, (str, Path)) else profile
        profile.check_model(lm.info)
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
    uniform = uniform_ladders(lm, policies, plan_file.budgets)
    others = [(name, f) for name, f, _ in alternatives]
    loaded, _ = resolve_samples(samples)

    def rungs(ladder: PlanFile) -> list:  # what is answered with, not how long its solve took
        return [[rung["constraint"]["average_budget"], rung["layers"]] for rung in ladder.to_dict()["plans"]]

    key = fingerprint_digest({"model": lm.info.model_id, "revision": lm.info.revision,
                              "dtype": str(getattr(lm.model, "dtype", "")), "device": str(lm.device),
                              "plan": rungs(plan_file), "alternatives": [[name, rungs(f)] for name, f in others],
                              "folds": [[fold_of.get(s.id) for s in loaded],  # what each sample answers with
                                        [[rungs(f) for f in files] for files in fold_files]],
                              "samples": samples_digest(loaded), "policies": policies, "guard": 3})
    candidates = 1 + len(others) + len(policies)
    stored = read_guard_cache(cache, key, budgets=len(plan_file.budgets), candidates=candidates)
    if stored is not None:
        replay = iter(stored["values"])
        plans, choices = guard_rungs(plan_file, uniform, lambda _: next(replay), where=where, alternatives=others)
        return replace(plan_file, plans=tuple(plans), schema_version=""), choices, stored["samples"]
    ladders = [plan_file, *(f for _, f in others), *(f for files in fold_files for f in files)]
    objective, measured = _measured_on(lm, loaded, ladders + [f for _, f in uniform],
                                       metric="task", stage="guard", budgets=len(plan_file.budgets),
                                       progress=progress)
    recorded: list[list[dict[str, float]]] = []

    def measure(plans: list[Plan]) -> list[dict[str, float]]:
        budget = plans[0].average_budget

        def for_sample(sample: Sample) -> list[Plan]:
            fold = fold_of.get(sample.id)  # a sample the profile does not hold never shaped the plan
            if fold is None or not fold_files:
                return plans
            return [files[fold].plan_for(budget) for files in fold_files] + plans[len(fold_files):]

        recorded.append(measured(plans, for_sample))
        return recorded[-1]

    plans, choices = guard_rungs(plan_file, uniform, measure, where=where, alternatives=others)
    if cache is not None:
        write_sealed_json(cache, {"run": key, "samples": len(objective.states), "values": recorded})
    return replace(plan_file, plans=tuple(plans), schema_version=""), choices, len(objective.states)


def set_names(policy_sets: Sequence[Sequence[str]]) -> list[tuple[str, list[str]]]:
    """(the guard's name for the plan of each further policy set, the set): "plan (N policies)", with the set's
    place (the first set, the plan's own, is 1) where two of them have the same size."""
    sets = [check_policy_names(list(chosen)) for chosen in policy_sets]
    sizes = [len(chosen) for chosen in sets]

    def count(n: int) -> str:
        return f"{n} {'policy' if n == 1 else 'policies'}"

    return [(f"plan ({count(n)})" if sizes.count(n) == 1 else f"plan (set {k + 2}, {count(n)})", chosen)
            for k, (n, chosen) in enumerate(zip(sizes, sets))]


def uniform_ladders(lm: LoadedModel, policies: Sequence[str],
                    budgets: Sequence[float]) -> list[tuple[str, PlanFile]]:
    """(policy, a uniform plan of it at each budget) for each policy: the single-policy candidates."""
    return [(policy, PlanFile.build(lm.info, [uniform_plan(lm.info, policy=policy, budget=b) for b in budgets]))
            for policy in policies]


def _measured_on(lm: LoadedModel, samples: list[Sample], files: Sequence[PlanFile], *, metric: str, stage: str,
                 budgets: int, progress: Progress | None
                 ) -> tuple[EndToEndObjective, Callable[..., list[dict[str, float]]]]:
    """The end-to-end objective over `samples` with every scorer the files' rungs use (each sample prefilled
    once), and its measure of one budget's rungs (optionally `plans_for(sample)`, each sample's own candidates in
    their place); `progress` hears of each prefill, then of each budget."""
    scorers = {name: scorer for f in files for rung in f.plans for name, scorer in rung.scorers.items()}
    steps = len(samples) + budgets

    def step(done: int, note: str) -> None:
        if progress:
            progress(stage, done, steps, note)

    step(0, "prefilling the calibration samples")
    objective = EndToEndObjective(lm, samples, policies=list(scorers.values()), metric=metric,
                                  on_prefill=lambda done, _: step(done, "prefilling the calibration samples"))
    done = [len(samples)]

    def measure(plans: list[Plan], plans_for: Callable[[Sample], list[Plan]] | None = None) -> list[dict[str, float]]:
        values = objective.measure_each(plans_for or (lambda _: plans), len(plans))
        done[0] += 1
        step(done[0], f"{plans[0].average_budget:g} tokens/layer measured")
        return values

    return objective, measure


def read_guard_cache(path: str | Path | None, key: str, *, budgets: int, candidates: int) -> dict | None:
    """The guard's stored measurements when `path` holds them for `key` in the expected shape; else None (the
    guard measures again, saying so when the file is damaged: it is a cache, never the only copy of anything)."""
    if path is None or not Path(path).is_file():
        return None
    try:
        stored = unseal(json.loads(Path(path).read_text()))  # its checksum: a damaged cache is never replayed
        values = stored["values"]
        ok = (stored["run"] == key and isinstance(stored["samples"], int) and len(values) == budgets
              and all(len(v) == candidates and all(isinstance(m.get("task"), (int, float)) and
                                                   isinstance(m.get("lost"), (int, float)) for m in v)
                      for v in values))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        logger.warning("guard cache %s is damaged (%s); measuring again", path, exc)
        return None
    return stored if ok else None


def choose(model: ModelSpec, plans: Mapping[str, PlanFile | str | Path] | Sequence[str | Path], *,
           data: DataSpec = CALIBRATION_DATA, metric: str = "lost", uniform: Sequence[str] = (),
           max_samples: int | None = None, device: str = "cpu", dtype: str = "auto",
           progress: Progress | None = None) -> ChooseResult:
    """Per budget, the candidate rung measuring best on calibration samples (never the evaluation data); `uniform`
    policies stand as candidates at every budget. Returns the chosen ladder and what was measured per budget."""
    named = _named_plans(plans)
    uniform = check_policy_names(list(uniform)) if uniform else []
    if len(named) + len(uniform) < 2:
        raise ConfigError("give at least two candidates: --plan a.json --plan b.json, or --plan a.json "
                          "--uniform h2o_recent,streaming")
    lm = resolve_model(model, device=device, dtype=dtype)
    for _, plan_file in named:
        plan_file.check_model(lm.info)
    budgets = sorted({b for _, f in named for b in f.budgets})
    named += uniform_ladders(lm, uniform, budgets)
    samples, _ = resolve_samples(data, max_samples=max_samples)
    objective, measure = _measured_on(lm, samples, [f for _, f in named], metric=metric, stage="choose",
                                      budgets=len(budgets), progress=progress)
    chosen, choices = choose_rungs(named, measure, metric=metric, tie_break="lost" if metric == "task" else None)
    return ChooseResult(plan_file=PlanFile.build(lm.info, chosen), choices=choices, samples=len(objective.states))


def check_proxy(profile: Profile | str | Path, *, budget: float, cost: str = "mass_lost", n_plans: int = 24,
                model: ModelSpec | None = None, data: DataSpec | None = None, max_samples: int | None = 8,
                seed: int = 0, device: str = "cpu", dtype: str = "auto") -> ProxyReport:
    """Spearman correlation between the profile's predicted loss and the measured KL of `n_plans` random plans."""
    if n_plans < 20:
        raise ConfigError(f"--n-plans {n_plans}: use at least 20 plans for a meaningful rank correlation")
    profile = Profile.load(profile) if isinstance(profile, (str, Path)) else profile
    lm = resolve_model(model if model is not None else profile.model.model_id, device=device, dtype=dtype)
    profile.check_model(lm.info)
    sources = data if data is not None else [e["source"] for e in profile.header.get("data", [])] or CALIBRATION_DATA
    samples, _ = resolve_samples(sources, max_samples=max_samples)
    objective = EndToEndObjective(lm, samples, policies=profile.policies, metric="kl")
    return proxy_check(profile, objective.many, budget=budget, n_plans=n_plans, cost=cost, seed=seed)


def _named_plans(plans: Mapping[str, PlanFile | str | Path] | Sequence[str | Path]) -> list[tuple[str, PlanFile]]:
    items = plans.items() if isinstance(plans, Mapping) else [(Path(p).stem, p) for p in plans]
    named = [(str(name), plan if isinstance(plan, PlanFile) else load_plan(plan)) for name, plan in items]
    names = [name for name, _ in named]
    if len(set(names)) != len(names):
        raise ConfigError(f"plan files need distinct names, got {', '.join(names)}; rename one of them")
    return named


def _only_budgets(name: str, plan_file: PlanFile, grid: list[float]) -> PlanFile:
    """The plan file's rungs at the asked budgets: a rung with no baseline beside it would only cost time."""
    kept = [p for p in plan_file.plans if p.average_budget in grid]
    if not kept:
        have = ", ".join(f"{p.average_budget:g}" for p in plan_file.plans)
        raise ConfigError(f"plan {name} has budgets {have}, none of them in --budgets "
                          f"{','.join(f'{b:g}' for b in grid)}; add one of its budgets or leave --budgets out")
    return replace(plan_file, plans=tuple(kept))
