"""`polykv-search optimize`, `check-proxy` and `choose`: choose a policy and budget per layer from a profile.

    polykv-search optimize --budget 512                              # exact DP on outputs/<model>/profile
    polykv-search optimize --budget 128,256,512,1024 --solver ilp    # one ladder file, HiGHS with status and gap
    polykv-search optimize --budget 256 --solver optuna --n-trials 60 --storage journal:outputs/study.log
    polykv-search check-proxy --budget 256                           # Spearman of predicted vs measured loss
    polykv-search choose --plan a.json --plan b.json --out best.json  # per budget, the rung measuring best
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from polykv_search.cli import app
from polykv_search.cli.errors import err_console
from polykv_search.cli.options import (
    CONSTRAINTS,
    DEFAULT_DEVICE,
    DEFAULT_MODEL,
    ILP,
    OPTUNA,
    CapOpt,
    CostOpt,
    DataOpt,
    DeviceOpt,
    DtypeOpt,
    FloorOpt,
    JsonOpt,
    MaxPoliciesOpt,
    MetricOpt,
    ModelOpt,
    NTrialsOpt,
    OnlyOpt,
    PoliciesOpt,
    ProfileOpt,
    SolverOpt,
    StorageOpt,
    TieOpt,
    WeightingOpt,
    check_out_file,
    choices,
    given,
    model_slug,
    parse_allowed,
    parse_budget_list,
    parse_str_list,
    parse_tied,
)
from polykv_search.cli.render import choice_table, plan_table, progress_bars
from polykv_search.errors import ConfigError
from polykv_search.models import same_model
from polykv_search.plan.names import METRICS

BudgetOpt = Annotated[str, typer.Option("--budget", "-b", help="Average tokens per compressible layer; a comma "
                                        "list writes a ladder of plans.")]


def profile_path(profile: Path | None, model: str) -> Path:
    return profile or Path("outputs") / model_slug(model) / "profile.safetensors"


def profile_model(ctx: typer.Context, model: str, recorded: str) -> str | None:
    """The model to measure with: --model when given, which must be the one the profile was calibrated on (checked
    by name, before any weight is read); None (the profile's own) when not given."""
    if not given(ctx, "model"):
        return None
    if not same_model(model, recorded):
        raise ConfigError(f"--model {model} does not match the profile, which was calibrated on {recorded}; pass "
                          f"that model's profile (--profile outputs/{model_slug(model)}/profile.safetensors) or "
                          "leave --model out")
    return model


@app.command()
def optimize(
    ctx: typer.Context,
    budget: BudgetOpt = "512",
    model: ModelOpt = DEFAULT_MODEL,
    profile: ProfileOpt = None,
    solver: SolverOpt = "dp",
    metric: MetricOpt = "kl",
    cost: CostOpt = "mass_lost",
    weighting: WeightingOpt = "mean",
    policies: PoliciesOpt = None,
    floor: FloorOpt = 1,
    cap: CapOpt = None,
    max_policies: MaxPoliciesOpt = None,
    max_changes: Annotated[int | None, typer.Option(help="--cost around_kl on a profile from `calibrate "
                                                    "--around-plan`: keep that plan but at most this many layers, "
                                                    "each moved to its best measured cell (a trust region: the "
                                                    "cells are exact one layer at a time).",
                                                    rich_help_panel=CONSTRAINTS)] = None,
    tie: TieOpt = None,
    only: OnlyOpt = None,
    target: Annotated[str, typer.Option(help="Engine the plans must fit as they are: kvpress (any plan), trtllm "
                                        "(StreamingLLM windows per layer; a per-head cost is summed over each "
                                        "layer's KV heads) or duo-attention (per KV head, StreamingLLM at one window "
                                        "or full; needs --cost head_fisher or head_kl). Then "
                                        "`polykv-search export --to TARGET`.")] = "kvpress",
    time_limit: Annotated[float, typer.Option(help="ilp: seconds before HiGHS stops.", rich_help_panel=ILP)] = 10.0,
    gap: Annotated[float, typer.Option(help="ilp: relative MIP gap to stop at.", rich_help_panel=ILP)] = 1e-6,
    n_trials: NTrialsOpt = 40,
    timeout: Annotated[float | None, typer.Option(help="optuna: seconds.", rich_help_panel=OPTUNA)] = None,
    storage: StorageOpt = None,
    data: DataOpt = None,
    max_samples: Annotated[int | None, typer.Option(min=1, help="select/optuna: calibration samples measured (default: "
                                                    "all).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed (optuna).", rich_help_panel=OPTUNA)] = 0,
    question_aware: Annotated[bool | None, typer.Option(
        "--question-aware/--query-agnostic", help="The setting the plan is for (the question compressed with the "
        "context, or asked after it); refused when the profile was calibrated in the other (default: the "
        "profile's).")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Plan file (default: outputs/<model>/plan.json)")
                   ] = None,
    device: DeviceOpt = DEFAULT_DEVICE,
    dtype: DtypeOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Choose a KV policy and token budget for every layer under an exact total budget; write a plan file."""
    # imported here, as in every command: the library loads torch, transformers and kvpress (about 4 s)
    import polykv_search as pk
    from polykv_search.optimization.figures import allocation_png

    config = pk.OptimizeConfig(solver=solver, cost=cost, weighting=weighting, metric=metric,
                               policies=tuple(parse_str_list(policies)) if policies else None, floor=floor, cap=cap,
                               max_policies=max_policies, max_changes=max_changes, tied=parse_tied(tie),
                               allowed=parse_allowed(only), time_limit=time_limit, mip_gap=gap, n_trials=n_trials,
                               timeout=timeout, storage=storage, seed=seed, target=target).validated()
    budgets = parse_budget_list(budget)
    check_out_file(out)
    path = profile_path(profile, model)
    loaded = pk.Profile.load(path)
    chosen_model = profile_model(ctx, model, loaded.model.model_id)
    with progress_bars() as progress:
        plan_file = pk.optimize(path, budgets=budgets, config=config, model=chosen_model, data=data,
                                max_samples=max_samples, device=device, dtype=dtype, progress=progress,
                                question_aware=question_aware)
    out_path = out or Path("outputs") / model_slug(plan_file.model.id) / "plan.json"
    plan_file.save(out_path)
    png = allocation_png(plan_file, out_path.with_suffix(".png"))
    if as_json:
        typer.echo(json.dumps({"plan": str(out_path), "png": str(png),
                               "plans": [{"budget": p.average_budget, **p.search.__dict__} for p in plan_file.plans]}))
        return
    err_console.print(plan_table(plan_file))
    typer.echo(f"plan: {out_path}")
    typer.echo(f"allocation: {png}")


@app.command("check-proxy")
def check_proxy_cmd(
    ctx: typer.Context,
    budget: Annotated[float, typer.Option("--budget", "-b", help="Average tokens per layer of the random plans.")] = 128,
    model: ModelOpt = DEFAULT_MODEL,
    profile: ProfileOpt = None,
    cost: CostOpt = "mass_lost",
    n_plans: Annotated[int, typer.Option(help="Random feasible plans (at least 20).")] = 24,
    data: DataOpt = None,
    max_samples: Annotated[int | None, typer.Option(min=1, help="Calibration samples measured per plan.")] = 8,
    seed: int = 0,
    device: DeviceOpt = DEFAULT_DEVICE,
    dtype: DtypeOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Spearman correlation between the profile's predicted loss and the measured KL of random plans."""
    # imported here: the library loads torch, transformers and kvpress (about 4 s)
    import polykv_search as pk
    from polykv_search.optimization.proxy import WEAK_PROXY

    if n_plans < 20:
        raise ConfigError(f"--n-plans {n_plans}: use at least 20 plans for a meaningful rank correlation")
    loaded = pk.Profile.load(profile_path(profile, model))
    chosen_model = profile_model(ctx, model, loaded.model.model_id)
    with err_console.status(f"measuring {n_plans} random plans"):
        report = pk.check_proxy(loaded, budget=budget, cost=cost, n_plans=n_plans, model=chosen_model, data=data,
                                max_samples=max_samples, seed=seed, device=device, dtype=dtype)
    if as_json:
        typer.echo(json.dumps(report.__dict__))
    else:
        typer.echo(f"spearman {report.spearman:.3f} (p={report.pvalue:.2g}) between predicted {cost} and measured "
                   f"KL over {n_plans} random plans at {budget:g} tokens/layer")
    if report.weak:
        err_console.print(f"warning: the additive proxy ranks plans poorly (rho < {WEAK_PROXY}); prefer "
                          "`--solver select` or `--solver optuna` (both measured end to end)")


@app.command("choose")
def choose_cmd(
    plan: Annotated[list[Path], typer.Option("--plan", "-p", help="Plan files to choose from.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="The chosen ladder (one plan per budget).")],
    model: ModelOpt = DEFAULT_MODEL,
    metric: Annotated[str, typer.Option(metavar=choices(METRICS), help="End-to-end measure on calibration samples "
                                        "(lower is better): lost (1 - exp(-KL) per sample), kl, nll, miss, or "
                                        "task (1 - the task's score of the greedy answer; ties decided by "
                                        "lost).")] = "lost",
    uniform: Annotated[str | None, typer.Option(help="Uniform policies that stand as candidates at every "
                                                "budget, e.g. h2o_recent,streaming (the plan keeps the best "
                                                "single policy where no plan measures better).")] = None,
    data: DataOpt = None,
    max_samples: Annotated[int | None, typer.Option(min=1, help="Calibration samples measured (default: all).")] = None,
    device: DeviceOpt = DEFAULT_DEVICE,
    dtype: DtypeOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Per budget, keep the candidate rung that measures best on calibration samples (never the eval data)."""
    # imported here: the library loads torch, transformers and kvpress (about 4 s)
    import polykv_search as pk

    if metric not in METRICS:
        raise ConfigError(f"--metric {metric!r} is not one of {', '.join(METRICS)}")
    check_out_file(out)
    uniform_policies = parse_str_list(uniform) if uniform is not None else []
    with progress_bars() as progress:
        result = pk.choose(model, plan, data=data or ["calibration_data/calib.jsonl"], metric=metric,
                                    uniform=uniform_policies, max_samples=max_samples, device=device, dtype=dtype,
                                    progress=progress)
    path = result.plan_file.save(out)
    if as_json:
        typer.echo(json.dumps({"plan": str(path), "choices": [c.__dict__ for c in result.choices]}))
        return
    what = "task loss (1 - score)" if metric == "task" else metric
    candidates = [p.stem for p in plan] + uniform_policies
    err_console.print(choice_table(candidates, result.choices, what=what, samples=result.samples))
    typer.echo("chosen: " + ", ".join(f"{c.budget:g} -> {c.chosen}" for c in result.choices))
    typer.echo(f"plan: {path}")
