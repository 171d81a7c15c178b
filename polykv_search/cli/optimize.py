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
from rich.table import Table

from polykv_search.cli import app
from polykv_search.cli._errors import err_console
from polykv_search.cli._options import (
    DEFAULT_MODEL,
    DataOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    WeightingOpt,
    model_slug,
    parse_str_list,
)

ProfileOpt = Annotated[Path | None, typer.Option("--profile", help="Profile from calibrate "
                                                 "(default: outputs/<model>/profile.safetensors).")]
BudgetOpt = Annotated[str, typer.Option("--budget", "-b", help="Average tokens per compressible layer; a comma "
                                        "list writes a ladder of plans.")]
SOLVER_CHOICES = ("dp", "ilp", "select", "optuna")
CostOpt = Annotated[str, typer.Option(help="Profile cost to minimise: mass_lost, out_err, layer_kl / layer_nll "
                                          "(profiles from `calibrate --layer-kl`) or around_kl (from `calibrate "
                                          "--around`, at its budgets).")]


def _parse_budgets(text: str) -> list[float]:
    from polykv_search.errors import ConfigError

    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--budget {text!r} is not a comma-separated list of numbers, e.g. 128,256,512") from None
    if not values or any(v < 1 for v in values):
        raise ConfigError(f"--budget {text!r}: budgets must be at least 1 token per layer")
    return [int(v) if v.is_integer() else v for v in values]


def _profile_path(profile: Path | None, model: str) -> Path:
    return profile or Path("outputs") / model_slug(model) / "profile.safetensors"


def _cap(loaded, cap: int | None) -> int:
    """Never more than the longest calibration context: more budget than context buys nothing."""
    longest = int(loaded.arrays["context_tokens"].max())
    return min(cap, longest) if cap else longest


@app.command()
def optimize(
    budget: BudgetOpt = "512",
    model: ModelOpt = DEFAULT_MODEL,
    profile: ProfileOpt = None,
    solver: Annotated[str, typer.Option(help="dp (exact, default), ilp (cvxpy + HiGHS), select (exact plans "
                                        "under several proxies and floors, uniform plans and allocators, the "
                                        "best measured end to end wins) or optuna (end-to-end search seeded "
                                        "with those candidates).")] = "dp",
    metric: Annotated[str, typer.Option(help="select/optuna: end-to-end measure on calibration samples: kl, "
                                        "nll, miss, lost (1 - exp(-KL) per sample) or task (1 - the task's score of "
                                        "the greedy answer; decodes every candidate).")] = "kl",
    cost: CostOpt = "mass_lost",
    weighting: WeightingOpt = "mean",
    policies: Annotated[str | None, typer.Option(help="Allowed policies (default: all in the profile).")] = None,
    floor: Annotated[int, typer.Option(help="Fewest tokens a layer may keep.")] = 1,
    cap: Annotated[int | None, typer.Option(help="Most tokens a layer may keep (default: longest context).")] = None,
    max_policies: Annotated[int | None, typer.Option(help="At most this many distinct policies.")] = None,
    max_changes: Annotated[int | None, typer.Option(help="--cost around_kl on a profile from `calibrate "
                                                    "--around-plan`: keep that plan but at most this many layers, "
                                                    "each moved to its best measured cell (a trust region: the "
                                                    "cells are exact one layer at a time).")] = None,
    tie: Annotated[list[str] | None, typer.Option(help="Layers forced to one policy and budget, e.g. '0,1,2'; "
                                                  "repeatable.")] = None,
    only: Annotated[list[str] | None, typer.Option(help="Restrict a policy to layers, e.g. 'streaming=0,1'; "
                                                   "repeatable.")] = None,
    time_limit: Annotated[float, typer.Option(help="ilp: seconds before HiGHS stops.")] = 10.0,
    gap: Annotated[float, typer.Option(help="ilp: relative MIP gap to stop at.")] = 1e-6,
    n_trials: Annotated[int, typer.Option(help="optuna: trials (seeds included).")] = 40,
    timeout: Annotated[float | None, typer.Option(help="optuna: seconds.")] = None,
    storage: Annotated[str | None, typer.Option(help="optuna: journal:PATH or an RDB URL; shared by processes "
                                                "and machines, resumable after a kill.")] = None,
    data: DataOpt = None,
    max_samples: Annotated[int | None, typer.Option(help="select/optuna: calibration samples measured (default: "
                                                    "all).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed (optuna).")] = 0,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Plan file (default: outputs/<model>/plan.json)")] = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Choose a KV policy and token budget for every layer under an exact total budget; write a plan file."""
    from polykv_search.calibrate.profile import ALL_COST_KINDS, Profile
    from polykv_search.errors import ConfigError
    from polykv_search.optimize import Problem, solve
    from polykv_search.optimize.plans import (
        allocation_png,
        plan_from_allocation,
        profile_signature,
    )
    from polykv_search.plan import PlanFile

    if solver not in SOLVER_CHOICES:
        raise ConfigError(f"--solver {solver!r} is not one of {', '.join(SOLVER_CHOICES)}")
    if cost not in ALL_COST_KINDS:
        raise ConfigError(f"--cost {cost!r} is not one of {', '.join(ALL_COST_KINDS)}")
    _check_metric(metric)
    if max_changes is not None:
        _check_refine_options(cost=cost, solver=solver, weighting=weighting, floor=floor, cap=cap,
                              max_policies=max_policies, tie=tie, only=only)
    budgets = _parse_budgets(budget)
    path = _profile_path(profile, model)
    loaded = Profile.load(path)
    info = loaded.model
    signature = profile_signature(path)
    names = parse_str_list(policies) if policies else None
    tied = [[int(x) for x in parse_str_list(t)] for t in tie] if tie else None
    allowed = None
    if only:
        allowed = {}
        for item in only:
            name, _, layers = item.partition("=")
            allowed[name.strip()] = [int(x) for x in parse_str_list(layers)]
    layer_cap = _cap(loaded, cap)
    objective = None
    if solver in ("select", "optuna"):
        objective = _objective(loaded, model=model, data=data, max_samples=max_samples, device=device, dtype=dtype,
                               metric=metric)
    plans = []
    for average in budgets:
        if max_changes is not None:
            plans.append(_refined_plan(loaded, average, max_changes, names, signature))
            continue
        problem = Problem.from_profile(loaded, average_budget=average, cost=cost, weighting=weighting, policies=names,
                                       floor=floor, cap=layer_cap, allowed=allowed, tied=tied,
                                       max_policies=max_policies)
        exact = solve(problem, solver="ilp" if solver == "ilp" else "dp", time_limit=time_limit, mip_gap=gap)
        plan = plan_from_allocation(info, exact, average_budget=average, signature=signature)
        if solver == "select":
            plan = select_end_to_end(loaded, objective, average=average, names=names, cap=layer_cap,
                                     signature=signature)
        elif solver == "optuna":
            plan = _optuna_plan(loaded, plan, objective, average=average, names=names, floor=floor, cap=layer_cap,
                                n_trials=n_trials, timeout=timeout, storage=storage, seed=seed, signature=signature)
        plans.append(plan)
    plan_file = PlanFile.build(info, plans)
    out_path = out or Path("outputs") / model_slug(info.model_id) / "plan.json"
    plan_file.save(out_path)
    png = allocation_png(plan_file, out_path.with_suffix(".png"))
    if as_json:
        typer.echo(json.dumps({"plan": str(out_path), "png": str(png),
                               "plans": [{"budget": p.average_budget, **p.search.__dict__} for p in plans]}))
        return
    err_console.print(_plan_table(plan_file))
    typer.echo(f"plan: {out_path}")
    typer.echo(f"allocation: {png}")


def _check_refine_options(*, cost: str, solver: str, weighting: str, floor: int, cap: int | None,
                          max_policies: int | None, tie, only) -> None:
    """--max-changes keeps the plan's own layers: the options that shape a fresh solve would be ignored."""
    from polykv_search.errors import ConfigError

    if cost != "around_kl" or solver != "dp":
        raise ConfigError("--max-changes refines a plan from around_kl probes; use it with --cost around_kl and "
                          "the default --solver dp")
    ignored = [flag for flag, used in (("--weighting", weighting != "mean"), ("--floor", floor != 1),
                                       ("--cap", cap is not None), ("--max-policies", max_policies is not None),
                                       ("--tie", bool(tie)), ("--only", bool(only))) if used]
    if ignored:
        raise ConfigError(f"--max-changes moves at most K layers of the probed plan to measured cells; "
                          f"{', '.join(ignored)} would be ignored, drop {'them' if len(ignored) > 1 else 'it'}")


def _refined_plan(profile, average: float, max_changes: int, names, signature: str):
    """optimize --max-changes: the profile's plan background at `average` with at most that many layers moved."""
    import time

    from polykv_search.optimize.plans import plan_from_choices
    from polykv_search.optimize.refine import refine
    from polykv_search.plan import SearchInfo

    started = time.perf_counter()
    found = refine(profile, average_budget=average, max_changes=max_changes, policies=names)
    search = SearchInfo(solver="refine", status="optimal", objective=found.predicted, profile_signature=signature,
                        seconds=round(time.perf_counter() - started, 4),
                        notes=f"plan {found.plan} with at most {max_changes} layers changed: "
                              f"{', '.join(map(str, found.changed)) or 'none'}")
    return plan_from_choices(profile.model, average_budget=average, policies=found.policies, budgets=found.budgets,
                             search=search)


def _plan_table(plan_file) -> Table:
    plans = list(plan_file.plans)
    table = Table(title=f"{plan_file.model.id}: policy and tokens per layer")
    table.add_column("layer", justify="right")
    for plan in plans:
        table.add_column(f"@{plan.average_budget:g}")
    for layer in range(plan_file.model.num_layers):
        cells = []
        for plan in plans:
            entry = plan.layers[layer]
            cells.append("(window)" if entry.policy is None else f"{entry.policy} {entry.budget}")
        table.add_row(str(layer), *cells)
    footer = []
    for plan in plans:
        s = plan.search
        obj = f"{s.objective:.4g}" if s.objective is not None else "-"
        gap = f" gap {s.gap:.2g}" if s.gap is not None else ""
        footer.append(f"{s.solver} {s.status}, obj {obj}{gap}, sum {plan.constraint.total_realised}")
    table.add_row("", *footer)
    return table


def _check_metric(metric: str) -> None:
    from polykv_search.errors import ConfigError
    from polykv_search.optimize.objective import METRICS

    if metric not in METRICS:
        raise ConfigError(f"--metric {metric!r} is not one of {', '.join(METRICS)}")


def _objective(profile, *, model, data, max_samples, device, dtype, metric, lm=None):
    """The end-to-end objective on the profile's calibration samples (prefilled once, reused for every budget)."""
    from polykv_search.data import load_samples, spread_over_tasks
    from polykv_search.models import load_model
    from polykv_search.optimize.objective import EndToEndObjective
    from polykv_search.plan import PlanFile, uniform_plan
    from polykv_search.plan.validate import check_matches_model

    info = profile.model
    if lm is None:
        lm = load_model(model if model != DEFAULT_MODEL or info.model_id == DEFAULT_MODEL else info.model_id,
                        device=device, dtype=dtype)
    probe = uniform_plan(info, policy=profile.policies[0], budget=16)
    check_matches_model(PlanFile.build(info, [probe]), lm.info)
    sources = data or [s["source"] for s in profile.header.get("data", [])] or ["calibration_data/calib.jsonl"]
    samples = spread_over_tasks([s for source in sources for s in load_samples(source)], max_samples)
    with err_console.status(f"prefilling {len(samples)} calibration samples for the end-to-end objective"):
        return EndToEndObjective(lm, samples, policies=profile.policies, metric=metric)


def select_end_to_end(profile, objective, *, average, names, cap, signature):
    """The best measured of the candidate plans (exact plans under each proxy and floor, uniform, allocators)."""
    import time

    from polykv_search.optimize.plans import plan_from_choices
    from polykv_search.optimize.select import candidate_plans, select_plan
    from polykv_search.plan import SearchInfo

    started = time.perf_counter()
    candidates = candidate_plans(profile, average=average, policies=names, cap=cap)
    with err_console.status(f"select: measuring {len(candidates)} candidate plans at {average:g} tokens/layer on "
                            f"{len(objective.states)} samples"):
        chosen = select_plan(objective.measure, candidates, metric=objective.metric)
    ranking = chosen.ranking()
    notes = (f"end-to-end mean {chosen.metric} over {len(objective.states)} calibration samples (mean over tasks); "
             f"{len(candidates)} candidates, best first: " + ", ".join(f"{k}={v:.4g}" for k, v in ranking[:8]))
    search = SearchInfo(solver="select", status=chosen.name, objective=chosen.value, bound=None, gap=None,
                        profile_signature=signature, seconds=round(time.perf_counter() - started, 2), notes=notes)
    return plan_from_choices(profile.model, average_budget=average, policies=chosen.policies,
                             budgets=chosen.budgets, search=search)


def _optuna_plan(profile, exact_plan, objective, *, average, names, floor, cap, n_trials, timeout, storage, seed,
                 signature):
    """Search end to end, seeded with the exact plan and every candidate of `select`."""
    from polykv_search.optimize.optuna_search import search
    from polykv_search.optimize.plans import plan_from_choices
    from polykv_search.optimize.select import candidate_plans
    from polykv_search.plan import SearchInfo, budget_total

    info = profile.model
    policies = names or profile.policies
    seeds = {"exact": (exact_plan.policies, exact_plan.budgets)}
    for name, candidate in candidate_plans(profile, average=average, policies=policies, cap=cap).items():
        if candidate not in seeds.values():
            seeds[name] = candidate
    with err_console.status(f"optuna: {n_trials} trials at {average:g} tokens/layer on {len(objective.states)} "
                            "samples"):
        result = search(objective, num_layers=info.num_layers, layers=info.compressible_layers, policies=policies,
                        total=budget_total(average, len(info.compressible_layers)), floor=floor, cap=cap,
                        seeds=seeds, n_trials=n_trials, timeout=timeout, storage=storage,
                        study_name=f"polykv-{signature[:12]}-{average:g}-{objective.metric}", seed=seed)
    notes = (f"end-to-end mean {objective.metric} over {len(objective.states)} calibration samples; best seed "
             f"{result.best_seed or 'none (a searched trial won)'}; seeds: "
             + ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.seed_objectives.items(), key=lambda kv: kv[1])))
    search_info = SearchInfo(solver="optuna", status=f"{result.trials} trials", objective=result.objective,
                             bound=None, gap=None, profile_signature=signature, seed=seed, seconds=None, notes=notes)
    return plan_from_choices(info, average_budget=average, policies=result.policies, budgets=result.budgets,
                             search=search_info)


@app.command("check-proxy")
def check_proxy_cmd(
    budget: Annotated[float, typer.Option("--budget", "-b", help="Average tokens per layer of the random plans.")] = 128,
    model: ModelOpt = DEFAULT_MODEL,
    profile: ProfileOpt = None,
    cost: CostOpt = "mass_lost",
    n_plans: Annotated[int, typer.Option(help="Random feasible plans (at least 20).")] = 24,
    data: DataOpt = None,
    max_samples: Annotated[int | None, typer.Option(help="Calibration samples measured per plan.")] = 8,
    seed: int = 0,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Spearman correlation between the profile's predicted loss and the measured KL of random plans."""
    from polykv_search.calibrate.profile import Profile
    from polykv_search.errors import ConfigError
    from polykv_search.optimize.proxy import WEAK_PROXY, check_proxy

    if n_plans < 20:
        raise ConfigError(f"--n-plans {n_plans}: use at least 20 plans for a meaningful rank correlation")
    loaded = Profile.load(_profile_path(profile, model))
    objective = _objective(loaded, model=model, data=data, max_samples=max_samples, device=device, dtype=dtype,
                           metric="kl")
    with err_console.status(f"measuring {n_plans} random plans on {len(objective.states)} samples"):
        report = check_proxy(loaded, objective.many, budget=budget, n_plans=n_plans, cost=cost, seed=seed)
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
    metric: Annotated[str, typer.Option(help="End-to-end measure on calibration samples (lower is better): "
                                        "lost (1 - exp(-KL) per sample), kl, nll, miss, or task (1 - the "
                                        "task's score of the greedy answer; ties decided by lost).")] = "lost",
    uniform: Annotated[str | None, typer.Option(help="Uniform policies that stand as candidates at every "
                                                "budget, e.g. h2o_recent,streaming (the plan keeps the best "
                                                "single policy where no plan measures better).")] = None,
    data: DataOpt = None,
    max_samples: Annotated[int | None, typer.Option(help="Calibration samples measured (default: all).")] = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Per budget, keep the candidate rung that measures best on calibration samples (never the eval data)."""
    from rich.markup import escape

    from polykv_search.data import load_samples, spread_over_tasks
    from polykv_search.errors import ConfigError
    from polykv_search.models import load_model
    from polykv_search.optimize.choose import choose_rungs
    from polykv_search.optimize.objective import EndToEndObjective
    from polykv_search.plan import PlanFile, uniform_plan
    from polykv_search.plan.validate import check_matches_model
    from polykv_search.policies import check_policy_names

    _check_metric(metric)
    uniform_policies = check_policy_names(parse_str_list(uniform)) if uniform is not None else []
    if len(plan) + len(uniform_policies) < 2:
        raise ConfigError("give at least two candidates: --plan a.json --plan b.json, or --plan a.json "
                          "--uniform h2o_recent,streaming")
    files = [(path.stem, PlanFile.load(path)) for path in plan]
    with err_console.status(f"loading {model}"):
        lm = load_model(model, device=device, dtype=dtype)
    for _, plan_file in files:
        check_matches_model(plan_file, lm.info)
    budgets = sorted({b for _, f in files for b in f.budgets})
    files += [(policy, PlanFile.build(lm.info, [uniform_plan(lm.info, policy=policy, budget=b) for b in budgets]))
              for policy in uniform_policies]
    policies = sorted({p for _, f in files for rung in f.plans for p in rung.policies if p is not None})
    samples = spread_over_tasks([s for source in data or ["calibration_data/calib.jsonl"]
                                 for s in load_samples(source)], max_samples)
    with err_console.status(f"prefilling {len(samples)} calibration samples"):
        objective = EndToEndObjective(lm, samples, policies=policies, metric=metric)
    with err_console.status("measuring every rung"):
        plans, choices = choose_rungs(files, objective.measure, metric=metric,
                                      tie_break="lost" if metric == "task" else None)
    path = PlanFile.build(lm.info, plans).save(out)
    if as_json:
        typer.echo(json.dumps({"plan": str(path), "choices": [c.__dict__ for c in choices]}))
        return
    what = "task loss (1 - score)" if metric == "task" else metric
    # one row per candidate (there may be many), one column per budget; the chosen rung in bold
    table = Table(title=f"mean {what} on {len(objective.states)} calibration samples (lower is better; "
                        "chosen in bold)")
    table.add_column("candidate", no_wrap=True)
    for choice in choices:
        table.add_column(f"{choice.budget:g}", justify="right")
    for name, _ in files:
        table.add_row(escape(name), *(("[bold]" if c.chosen == name else "") + f"{c.measured[name]:.4f}"
                              if name in c.measured else "-" for c in choices))
    err_console.print(table)
    typer.echo("chosen: " + ", ".join(f"{c.budget:g} -> {c.chosen}" for c in choices))
    typer.echo(f"plan: {path}")
