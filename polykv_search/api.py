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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from polykv_search.calibration import CalibrationConfig, CalibrationRun, Profile, calibrate_model
from polykv_search.calibration.figures import signal_heatmap
from polykv_search.calibration.modes import calibration_for_cost
from polykv_search.calibration.profile import HEAD_FISHER
from polykv_search.calibration.shards import Shard
from polykv_search.checkpoints import folder_lock
from polykv_search.data import DataSpec, resolve_samples
from polykv_search.engine import EndToEndObjective
from polykv_search.engine.progress import Progress
from polykv_search.errors import ConfigError
from polykv_search.evaluation import (ALLOCATORS, Report, build_methods, check_allocators, check_targets,
                                      score_methods, summarize)
from polykv_search.io import file_sha256
from polykv_search.models import DEFAULT_DEVICE, DEFAULT_MODEL, LoadedModel, ModelSpec, model_slug, resolve_model
from polykv_search.optimization.choose import Choice, choose_among
from polykv_search.optimization.figures import allocation_png
from polykv_search.optimization.guard import GuardRung, guard_plan
from polykv_search.optimization.policy_sets import candidate_sets
from polykv_search.optimization.lengths import (LengthRun, by_length, calibrated_lengths, calibration_splits,
                                                guard_each_length, readable_splits, shortest_first, split_folders,
                                                with_context)
from polykv_search.optimization.proxy import ProxyReport, check_proxy_on
from polykv_search.optimization.run import OptimizeConfig, check_budgets, optimize_profile
from polykv_search.optimization.targets import check_target_budgets
from polykv_search.plan import ContextRange, PlanFile
from polykv_search.plan.plan import setting_name
from polykv_search.plan.named import named_plan_files, only_budgets, warn_other_setting
from polykv_search.plan.names import Metric
from polykv_search.policies import DEFAULT_POLICIES, check_policy_names

CALIBRATION_DATA = "calibration_data/calib.jsonl"
LONG_CALIBRATION_DATA = "calibration_data/calib_long.jsonl"  # 6k-8k tokens: `run`'s second length bucket
CALIBRATION_SPLITS = (CALIBRATION_DATA, LONG_CALIBRATION_DATA)
LONG_CALIBRATION_CONTEXT = 8192  # tokens a model must read for LONG_CALIBRATION_DATA's prompts, question included
EVALUATION_DATA = "calibration_data/eval.jsonl"

__all__ = ["CALIBRATION_DATA", "EVALUATION_DATA", "ChooseResult", "DataSpec", "ModelSpec", "Progress", "RunResult",
           "calibrate", "check_proxy", "choose", "default_out_dir", "evaluate", "guard_plan", "optimize",
           "resolve_model", "resolve_samples", "run"]


@dataclass
class RunResult:
    """What `run` wrote and measured: the profile, the plan file, the evaluation report, and where each is."""

    out_dir: Path
    calibration: CalibrationRun
    plan_file: PlanFile  # the plan as written: each rung the optimized one or, where the guard replaced it, uniform
    plan_path: Path
    report: Report  # report.files: where its json, markdown and png are
    guard: list[GuardRung] = field(default_factory=list)  # per budget, what the guard measured and kept (none: off)
    guard_samples: int = 0
    # per calibration split (a range of prompt lengths, shortest first): its calibration, and what its guard kept
    by_length: list[LengthRun] = field(default_factory=list)


@dataclass
class ChooseResult:
    """The ladder `choose` kept, what it measured per budget, and on how many calibration samples."""

    plan_file: PlanFile
    choices: list[Choice]
    samples: int


def default_out_dir(model: ModelSpec) -> Path:
    """outputs/<model>: where the commands write a model's profile, plan and report unless told otherwise."""
    return Path("outputs") / model_slug(model.info.model_id if isinstance(model, LoadedModel) else model)


def calibrate(model: ModelSpec = DEFAULT_MODEL, data: DataSpec = CALIBRATION_DATA, *,
              config: CalibrationConfig = CalibrationConfig(), out_dir: str | Path | None = None,
              max_samples: int | None = None, column_map: Mapping[str, str] | None = None, resume: bool = False,
              device: str = DEFAULT_DEVICE, dtype: str = "auto", trust_remote_code: bool = False,
              revision: str | None = None, progress: Progress | None = None,
              shard: Shard | tuple[int, int] | str | None = None) -> CalibrationRun:
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
             max_samples: int | None = None, device: str = DEFAULT_DEVICE, dtype: str = "auto",
             progress: Progress | None = None, question_aware: bool | None = None) -> PlanFile:
    """One plan per average budget (tokens per compressible layer) from a profile: a ladder, returned unsaved
    (`PlanFile.save` writes it). The end-to-end solvers (select, optuna) measure plans on calibration samples:
    `model` (default: the profile's) and `data` (default: the profile's calibration data). The plan is made for
    the setting the profile was calibrated in; `question_aware` (None: that one) is refused when it differs."""
    config = config.validated()
    budgets = check_budgets(budgets)
    signature = None
    if not isinstance(profile, Profile):
        signature = file_sha256(profile) if Path(profile).is_file() else None
        profile = Profile.load(profile)
    if question_aware is not None and question_aware != profile.meta.question_aware:
        raise ConfigError(f"the profile was calibrated {setting_name(profile.meta.question_aware)}, so its plans "
                          f"are too; calibrate {'with' if question_aware else 'without'} --question-aware for a "
                          f"{setting_name(question_aware)} plan")
    objective = None
    if config.end_to_end:
        lm = resolve_model(model if model is not None else profile.model.model_id, device=device, dtype=dtype)
        profile.check_model(lm.info)
        sources = data if data is not None else profile.meta.data_sources or CALIBRATION_DATA
        samples, _ = resolve_samples(sources, max_samples=max_samples)
        if progress:
            progress("optimize", 0, len(samples), f"prefilling {len(samples)} calibration samples")
        objective = EndToEndObjective(lm, samples, policies=profile.policies, metric=config.metric,
                                      question_aware=profile.meta.question_aware)
    message = (lambda text: progress("optimize", 0, 0, text)) if progress else None
    ladder = optimize_profile(profile, budgets, config=config, objective=objective, profile_signature=signature,
                              progress=message)
    lengths = calibrated_lengths(profile)  # recorded so the runtime can say when prompts are far longer
    return with_context(ladder, ContextRange(calibrated=lengths)) if lengths else ladder


def evaluate(model: ModelSpec = DEFAULT_MODEL, data: DataSpec = EVALUATION_DATA, *,
             plans: Mapping[str, PlanFile | str | Path] | Sequence[str | Path] = (),
             budgets: Sequence[float] | None = None, policies: Sequence[str] | None = None,
             allocators: Sequence[str] = ALLOCATORS, allocator_policy: str = "snapkv",
             profile: Profile | str | Path | None = None, out_dir: str | Path | None = None,
             max_samples: int | None = None, max_context_tokens: int | None = None, with_kl: bool = True,
             batch_size: int = 16, column_map: Mapping[str, str] | None = None, resume: bool = False,
             device: str = DEFAULT_DEVICE, dtype: str = "auto", trust_remote_code: bool = False,
             revision: str | None = None, progress: Progress | None = None,
             targets: Mapping[str, str] | None = None, question_aware: bool = False) -> Report:
    """Answer held-out samples with the full cache, every uniform policy, PyramidKV and CAKE (CAKE needs a
    `profile`) and Ada-KV (`allocators`) at each budget, and the given plans at their own budgets; score each
    answer by its task's metric; gap recovery R per budget. `plans`: name -> plan file (or paths, named by their
    stem). `budgets` default: the plans' budgets, else 64, 128, 256, 512; plan rungs at other budgets are left
    out. `targets` (plan name -> trtllm or duo-attention): those plans' R against the engine's own setting too.
    `question_aware`: every method compresses the question with the context (kvpress's second setting); a plan
    made for the other setting is said so once. Writes the checkpoints and the report (json, md, png) under
    `out_dir` (default outputs/<model>/eval)."""
    named = named_plan_files(plans)
    warn_other_setting(named, question_aware)
    targets = check_targets(targets, [name for name, _ in named])
    if budgets is not None:
        grid = check_budgets(budgets)
        named = [(name, only_budgets(name, plan_file, grid)) for name, plan_file in named]
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
                                allocator_policy=allocator_policy, profile=loaded_profile, plans=named,
                                targets=targets)
        step = (lambda done, total: progress("evaluate", done, total, f"{len(methods) + 1} methods per sample")) \
            if progress else None
        results = score_methods(lm, samples, methods, out_dir=out, resume=resume, with_kl=with_kl,
                                batch_size=batch_size, max_context_tokens=max_context_tokens, progress=step,
                                question_aware=question_aware)
        report = summarize(results, methods, kv_slots=len(lm.info.compressible_layers) * lm.info.num_kv_heads)
        report.question_aware = question_aware
        title = f"{lm.info.model_id} on {', '.join(Path(s).name for s in sources) or f'{len(samples)} samples'}" + \
            (" (question-aware)" if question_aware else "")
        report.save(out, title=title)
        return report


def run(model: ModelSpec = DEFAULT_MODEL, *, budgets: float | Sequence[float] = 128,
        calib: DataSpec | None = None, calib_splits: Sequence[DataSpec] | None = None,
        eval_data: DataSpec = EVALUATION_DATA, strict_lengths: bool = False,
        policies: Sequence[str] | None = None, policy_sets: Sequence[Sequence[str]] | None = None,
        grid: Sequence[int] | None = None, compare: Sequence[str] | None = None,
        allocators: Sequence[str] = ALLOCATORS, config: OptimizeConfig = OptimizeConfig(cost=HEAD_FISHER),
        max_calib_samples: int | None = None, max_eval_samples: int | None = None, out_dir: str | Path | None = None,
        fresh: bool = False, guard: bool = True, column_map: Mapping[str, str] | None = None,
        max_context_tokens: int | None = None, question_aware: bool = False,
        device: str = DEFAULT_DEVICE, dtype: str = "auto", trust_remote_code: bool = False, revision: str | None = None,
        progress: Progress | None = None) -> RunResult:
    """The whole job on one model: calibrate on `calib`, optimize a plan per budget, evaluate it on the held-out
    `eval_data` against the full cache, the uniform policies and the `allocators` (PyramidKV, CAKE and Ada-KV
    by default; checked before any work). Everything goes under `out_dir` (default outputs/<model>/); an
    interrupted run resumes where it stopped (`fresh`: start over, discarding the folder's checkpoints).

    `config.cost` decides the calibrate mode (calibration/modes.py). The default, head_fisher, plans a policy and
    budget per KV head, one plan per policy set (`policy_sets`, default PER_HEAD_POLICY_SETS; `policies` or
    `config.policies` alone: that one set; optimization/policy_sets.py). `guard` (the default): per budget, the best
    set's rung is kept only where its cross-fitted task score on the `calib` samples is at least that of every
    uniform policy in `compare`, else the best of them takes its place (optimization/guard.py; the first set's
    ladder stays in plan_optimized.json). `compare` (default: DEFAULT_POLICIES) is also the uniform
    policies the evaluation scores. `config.target` trtllm or duo-attention: the streaming costs alone, plans in the
    engine's form, each rung guarded against the engine's own setting at its budget (optimization/targets.py). The
    loading options (`column_map`, `max_context_tokens`, `trust_remote_code`, `revision`) are calibrate's and
    evaluate's.

    Prompt lengths: `calib_splits` (default CALIBRATION_SPLITS: calib.jsonl, 1.1k-3.9k tokens, and calib_long.jsonl,
    6k-8k; `calib`: one split alone) are calibrated, optimized and guarded each on its own, and the plan holds, per
    budget, one rung per split serving the prompt lengths around it (optimization/lengths.py; the runtime picks by
    the prompt's length). The first split's files go to `out_dir`, the others' to `out_dir/calib-<name>/`. With the
    default splits, a model that cannot read 8k tokens is calibrated on calib.jsonl alone, saying so.
    `strict_lengths`: the plan refuses prompts far longer than its longest split instead of serving them with its
    last rung. `question_aware`: every stage prompts with the question compressed with the context (kvpress's
    second setting), and the plan records it."""
    config = config.validated()
    budgets = check_budgets(budgets)
    policies, policy_sets = candidate_sets(config, policies, policy_sets, guard=guard)
    resolve_samples(eval_data, max_samples=max_eval_samples, column_map=column_map)  # refused before any work
    allocators = check_allocators(allocators)
    splits = calibration_splits(calib, calib_splits, default=CALIBRATION_SPLITS, max_samples=max_calib_samples,
                                column_map=column_map)  # a missing or empty split is refused before any work
    out = Path(out_dir) if out_dir is not None else default_out_dir(model)
    with folder_lock(out):  # a second run on the folder is refused before the model loads
        lm = resolve_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                           revision=revision)
        splits = readable_splits(splits, lm.info, defaulted=calib is None and calib_splits is None,
                                 long_context=LONG_CALIBRATION_CONTEXT)
        return _run_locked(lm, budgets=budgets, splits=splits, strict_lengths=strict_lengths, eval_data=eval_data,
                           policies=policies, policy_sets=policy_sets, grid=grid,
                           compare=check_policy_names(list(compare)) if compare else list(DEFAULT_POLICIES),
                           allocators=allocators, config=config, max_calib_samples=max_calib_samples,
                           max_eval_samples=max_eval_samples, out=out, fresh=fresh, guard=guard,
                           column_map=column_map, max_context_tokens=max_context_tokens, progress=progress,
                           question_aware=question_aware)


def _run_locked(lm: LoadedModel, *, budgets: list[float], splits: list[DataSpec], strict_lengths: bool,
                eval_data: DataSpec, policies: Sequence[str] | None, policy_sets: list[list[str]],
                grid: Sequence[int] | None, compare: list[str], allocators: list[str], config: OptimizeConfig,
                max_calib_samples: int | None, max_eval_samples: int | None, out: Path, fresh: bool, guard: bool,
                column_map: Mapping[str, str] | None, max_context_tokens: int | None,
                progress: Progress | None, question_aware: bool) -> RunResult:
    calibration_config = replace(calibration_for_cost(config.cost, budgets=budgets, policies=policies, grid=grid,
                                                      max_context_tokens=max_context_tokens),
                                 question_aware=question_aware)
    check_target_budgets(config, budgets, calibration_config.budgets, lm.info)  # refused before calibrating
    folders = split_folders(out, splits)
    calibrations = [calibrate(lm, split, config=calibration_config, out_dir=folder, max_samples=max_calib_samples,
                              column_map=column_map, resume=not fresh, progress=progress)
                    for split, folder in zip(splits, folders)]
    signal_heatmap(calibrations[0].profile, out / "signals.png")
    order, ranges = shortest_first([c.profile for c in calibrations], strict=strict_lengths)
    splits, folders, calibrations = ([xs[k] for k in order] for xs in (splits, folders, calibrations))
    if policy_sets:  # the plan of the first set; the guard weighs the others' against it per budget
        config = replace(config, policies=tuple(policy_sets[0]))
    ladders = []
    for calibration, split in zip(calibrations, splits):
        every_sample = resolve_samples(split, column_map=column_map)[0] if config.end_to_end else split
        ladders.append(optimize(calibration.path, budgets=budgets, config=config, model=lm, data=every_sample,
                                progress=progress))
    plan_file = by_length(ladders, ranges)
    parts = [LengthRun(context=context, calibration=c) for context, c in zip(ranges, calibrations)]
    if guard:
        plan_file.save(out / "plan_optimized.json")
        plan_file = guard_each_length(lm, ladders, parts, splits, folders, policies=compare, config=config,
                                      policy_sets=policy_sets, fresh=fresh, max_samples=max_calib_samples,
                                      column_map=column_map, max_context_tokens=max_context_tokens,
                                      progress=progress)
    plan_path = plan_file.save(out / "plan.json")
    allocation_png(plan_file, out / "plan.png")
    report = evaluate(lm, eval_data, plans={"plan": plan_file}, targets={"plan": config.target}, budgets=budgets,
                      policies=compare, allocators=allocators, profile=calibrations[0].profile, out_dir=out / "eval",
                      max_samples=max_eval_samples, max_context_tokens=max_context_tokens, column_map=column_map,
                      resume=not fresh, progress=progress, question_aware=question_aware)
    first = parts[0]
    return RunResult(out_dir=out, calibration=calibrations[0], plan_file=plan_file, plan_path=plan_path,
                     report=report, guard=first.guard, guard_samples=first.guard_samples, by_length=parts)


def choose(model: ModelSpec, plans: Mapping[str, PlanFile | str | Path] | Sequence[str | Path], *,
           data: DataSpec = CALIBRATION_DATA, metric: Metric = "lost", uniform: Sequence[str] = (),
           max_samples: int | None = None, device: str = DEFAULT_DEVICE, dtype: str = "auto",
           progress: Progress | None = None) -> ChooseResult:
    """Per budget, the candidate rung measuring best on calibration samples (never the evaluation data); `uniform`
    policies stand as candidates at every budget. Returns the chosen ladder and what was measured per budget."""
    named = named_plan_files(plans)
    uniform = check_policy_names(list(uniform)) if uniform else []
    if len(named) + len(uniform) < 2:
        raise ConfigError("give at least two candidates: --plan a.json --plan b.json, or --plan a.json "
                          "--uniform h2o_recent,streaming")
    lm = resolve_model(model, device=device, dtype=dtype)
    samples, _ = resolve_samples(data, max_samples=max_samples)
    plan_file, choices, measured = choose_among(lm, named, uniform, samples, metric=metric, progress=progress)
    return ChooseResult(plan_file=plan_file, choices=choices, samples=measured)


def check_proxy(profile: Profile | str | Path, *, budget: float, cost: str = "mass_lost", n_plans: int = 24,
                model: ModelSpec | None = None, data: DataSpec | None = None, max_samples: int | None = 8,
                seed: int = 0, device: str = DEFAULT_DEVICE, dtype: str = "auto") -> ProxyReport:
    """Spearman correlation between the profile's predicted loss and the measured KL of `n_plans` random plans."""
    if n_plans < 20:
        raise ConfigError(f"--n-plans {n_plans}: use at least 20 plans for a meaningful rank correlation")
    profile = Profile.load(profile) if isinstance(profile, (str, Path)) else profile
    lm = resolve_model(model if model is not None else profile.model.model_id, device=device, dtype=dtype)
    samples, _ = resolve_samples(data if data is not None else profile.meta.data_sources or CALIBRATION_DATA,
                                 max_samples=max_samples)
    return check_proxy_on(lm, profile, samples, budget=budget, n_plans=n_plans, cost=cost, seed=seed)
