"""`polykv-search run`: the whole job on one model — calibrate on the calib split, optimize, evaluate on the
held-out eval split — with everything under outputs/<model>/ and the comparison table with R at the end.

    polykv-search run                                    # smollm2-135m at 128 tokens per layer
    polykv-search run --model gemma3-270m --budget 64,128,256,512 --solver dp
    polykv-search run --budget 64,128,256,512 --cost layer_kl --max-calib-samples 12 \\
        --policies streaming,snapkv,h2o_recent,tova_recent,expected_attention_recent \\
        --grid 16,32,64,128,256,512,1024,2048           # the per-layer KL cost (slower calibration)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from polykv_search.cli import app
from polykv_search.cli._errors import err_console
from polykv_search.cli._options import (
    DEFAULT_MODEL,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    WeightingOpt,
    model_slug,
    parse_int_list,
    parse_str_list,
)


@app.command()
def run(
    model: ModelOpt = DEFAULT_MODEL,
    budget: Annotated[str, typer.Option("--budget", "-b", help="Average tokens per layer; a comma list "
                                        "optimizes and evaluates a ladder.")] = "128",
    solver: Annotated[str, typer.Option(help="dp, ilp, select or optuna (see `optimize --help`).")] = "dp",
    metric: Annotated[str, typer.Option(help="select/optuna: end-to-end measure: kl, nll, miss, lost or task.")] = "kl",
    cost: Annotated[str, typer.Option(help="Profile cost: mass_lost, out_err, layer_kl or layer_nll "
                                      "(these two calibrate with --layer-kl: slower), or around_kl (calibrates "
                                      "with --around at the --budget values: slower still).")] = "mass_lost",
    weighting: WeightingOpt = "mean",
    policies: Annotated[str | None, typer.Option(help="Policies to calibrate and plan with (default: all); the "
                                                 "evaluation still compares every uniform policy.")] = None,
    grid: Annotated[str | None, typer.Option(help="Calibration budget grid, e.g. 16,32,64,128,256,512,1024,2048 "
                                             "(default: calibrate's).")] = None,
    max_calib_samples: Annotated[int | None, typer.Option(help="Calibrate on N samples, taken in turn from each "
                                                          "task (default: all).")] = None,
    calib: Annotated[Path, typer.Option(help="Calibration split.")] = Path("calibration_data/calib.jsonl"),
    eval_data: Annotated[Path, typer.Option("--eval", help="Held-out split.")] = Path("calibration_data/eval.jsonl"),
    max_eval_samples: Annotated[int | None, typer.Option(help="Evaluate on N samples, taken in turn from each "
                                                         "task.")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Folder (default: outputs/<model>)")] = None,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    as_json: JsonOpt = False,
) -> None:
    """Calibrate, optimize and evaluate in one go; interrupted runs resume where they stopped."""
    from polykv_search.calibrate.budgets import DEFAULT_BUDGETS
    from polykv_search.calibrate.profile import (
        ALL_COST_KINDS,
        AROUND_KL,
        OPTIONAL_COST_KINDS,
    )
    from polykv_search.calibrate.report import signal_heatmap
    from polykv_search.calibrate.run import CalibrationConfig
    from polykv_search.calibrate.run import calibrate as run_calibration
    from polykv_search.cli.optimize import (
        SOLVER_CHOICES,
        _cap,
        _check_metric,
        _objective,
        _optuna_plan,
        _parse_budgets,
        _plan_table,
        select_end_to_end,
    )
    from polykv_search.data import load_samples, spread_over_tasks
    from polykv_search.errors import ConfigError
    from polykv_search.evaluate.methods import build_methods
    from polykv_search.evaluate.report import markdown, summarize, write_report
    from polykv_search.evaluate.run import evaluate as run_evaluation
    from polykv_search.models import load_model
    from polykv_search.optimize import Problem, solve
    from polykv_search.optimize.plans import (
        allocation_png,
        plan_from_allocation,
        profile_signature,
    )
    from polykv_search.plan import PlanFile
    from polykv_search.policies import DEFAULT_POLICIES

    if solver not in SOLVER_CHOICES:
        raise ConfigError(f"--solver {solver!r} is not one of {', '.join(SOLVER_CHOICES)}")
    if cost not in ALL_COST_KINDS:
        raise ConfigError(f"--cost {cost!r} is not one of {', '.join(ALL_COST_KINDS)}")
    _check_metric(metric)
    budgets = _parse_budgets(budget)
    out_dir = out or Path("outputs") / model_slug(model)
    calib_samples = spread_over_tasks(load_samples(calib), max_calib_samples)
    config = CalibrationConfig(
        policies=tuple(parse_str_list(policies)) if policies else DEFAULT_POLICIES,
        budgets=tuple(parse_int_list(grid, option="--grid")) if grid else DEFAULT_BUDGETS,
        layer_kl=cost in OPTIONAL_COST_KINDS, around=_around(budgets) if cost == AROUND_KL else ()).validated()
    eval_samples = spread_over_tasks(load_samples(eval_data), max_eval_samples)
    with err_console.status(f"loading {model}"):
        lm = load_model(model, device=device, dtype=dtype)

    err_console.rule("1/3 calibrate")
    with err_console.status(f"calibrating on {len(calib_samples)} samples of {calib.name}"):
        calibration = run_calibration(lm, calib_samples, config=config,
                                      data_sources=[str(calib)], out_dir=out_dir, resume=True)
    signal_heatmap(calibration.profile, out_dir / "signals.png")
    err_console.print(f"profile: {calibration.path} ({calibration.seconds:.0f} s)")

    err_console.rule("2/3 optimize")
    profile = calibration.profile
    signature = profile_signature(calibration.path)
    objective = None
    if solver in ("select", "optuna"):
        objective = _objective(profile, model=model, data=[str(calib)], max_samples=None, device=device,
                               dtype=dtype, metric=metric, lm=lm)
    plans = []
    for average in budgets:
        problem = Problem.from_profile(profile, average_budget=average, cost=cost, weighting=weighting,
                                       cap=_cap(profile, None))
        exact = solve(problem, solver="ilp" if solver == "ilp" else "dp")
        plan = plan_from_allocation(lm.info, exact, average_budget=average, signature=signature)
        if solver == "select":
            plan = select_end_to_end(profile, objective, average=average, names=None, cap=_cap(profile, None),
                                     signature=signature)
        elif solver == "optuna":
            plan = _optuna_plan(profile, plan, objective, average=average, names=None, floor=1,
                                cap=_cap(profile, None), n_trials=40, timeout=None, storage=None, seed=0,
                                signature=signature)
        plans.append(plan)
    plan_file = PlanFile.build(lm.info, plans)
    plan_path = plan_file.save(out_dir / "plan.json")
    allocation_png(plan_file, out_dir / "plan.png")
    err_console.print(_plan_table(plan_file))

    err_console.rule("3/3 evaluate")
    methods = build_methods(lm.info, budgets=[p.average_budget for p in plans], uniform_policies=DEFAULT_POLICIES,
                            allocators=("pyramidkv", "cake"), allocator_policy="snapkv", profile=profile,
                            plans=[("plan", plan_file)])
    with err_console.status(f"evaluating {len(methods.methods) + 1} methods on {len(eval_samples)} held-out samples"):
        results = run_evaluation(lm, eval_samples, methods, out_dir=out_dir / "eval", resume=True)
    summary = summarize(results, methods.methods)
    paths = write_report(summary, results, out_dir / "eval", title=f"{lm.info.model_id} on {eval_data.name}")
    if as_json:
        typer.echo(json.dumps({"profile": str(calibration.path), "plan": str(plan_path),
                               "report": str(paths["json"]), "recovery": summary["recovery"]}))
        return
    err_console.print(markdown(summary), markup=False, highlight=False)
    for r in summary["recovery"]:
        if r["method"] == "plan":
            interval = f", 90% bootstrap [{r['R_90'][0]:+.2f}, {r['R_90'][1]:+.2f}]" if r.get("R_90") else ""
            typer.echo(f"R at {r['budget']:g} tokens/layer: {r['R'] if r['R'] is None else round(r['R'], 3)} "
                       f"(plan {r['score']:.3f}, best uniform {r['best_uniform']} {r['best_uniform_score']:.3f}, "
                       f"full {r['full_score']:.3f}{interval})")
    typer.echo(f"report: {paths['markdown']}")


def _around(budgets: list[float]) -> tuple[int, ...]:
    """--cost around_kl: the operating points to calibrate at are the budgets to plan for (whole tokens)."""
    from polykv_search.errors import ConfigError

    if any(not float(b).is_integer() for b in budgets):
        raise ConfigError(f"--cost around_kl measures whole-token operating points; --budget {budgets} has a "
                          "fraction: use whole numbers of tokens per layer")
    return tuple(int(b) for b in budgets)

