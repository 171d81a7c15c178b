"""`polykv-search evaluate`: full cache vs every uniform policy vs PyramidKV and CAKE vs your plans, with R.

    polykv-search evaluate --plan outputs/smollm2-135m/plan.json           # budgets taken from the plan
    polykv-search evaluate --budgets 64,128,256,512 --max-samples 20       # baselines only
    polykv-search evaluate --model gemma3-270m --plan p.json --data calibration_data/eval_alt.jsonl --resume
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from polykv_search.cli import app
from polykv_search.cli._errors import err_console
from polykv_search.cli._options import (
    DEFAULT_MODEL,
    ColumnMapOpt,
    DataOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    ModelOpt,
    RevisionOpt,
    TrustOpt,
    model_slug,
    parse_column_map,
    parse_int_list,
    parse_str_list,
)

if TYPE_CHECKING:
    from polykv_search.plan import PlanFile

DEFAULT_EVAL = "calibration_data/eval.jsonl"
DEFAULT_BUDGETS = (64, 128, 256, 512)
logger = logging.getLogger("polykv_search.cli")


@app.command()
def evaluate(
    model: ModelOpt = DEFAULT_MODEL,
    plan: Annotated[list[Path] | None, typer.Option("--plan", "-p", help="Plan file(s) to score; repeatable.")] = None,
    data: DataOpt = None,
    budgets: Annotated[str | None, typer.Option(help="Budgets to compare at (default: the plans' budgets, "
                                                "else 64,128,256,512); plan rungs at other budgets are skipped.")] = None,
    policies: Annotated[str | None, typer.Option(help="Uniform policies to compare (default: all).")] = None,
    allocator_policy: Annotated[str, typer.Option(help="Policy used by the PyramidKV and CAKE allocations.")] = "snapkv",
    profile: Annotated[Path | None, typer.Option(help="Profile for CAKE's signals (default: "
                                                 "outputs/<model>/profile.safetensors if present).")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (default: outputs/<model>/eval)")] = None,
    max_samples: Annotated[int | None, typer.Option(help="Use N samples, taken in turn from each task.")] = None,
    max_context: Annotated[int | None, typer.Option(help="Truncate prompts (middle) to this many tokens.")] = None,
    kl: Annotated[bool, typer.Option("--kl/--no-kl", help="Also score KL to the full cache.")] = True,
    batch_size: Annotated[int, typer.Option(help="Methods decoded together per batch.")] = 16,
    column_map: ColumnMapOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run.")] = False,
    device: DeviceOpt = "cpu",
    dtype: DtypeOpt = "auto",
    trust_remote_code: TrustOpt = False,
    revision: RevisionOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Score the full cache, uniform policies, PyramidKV, CAKE and plans on held-out data; report gap recovery."""
    from polykv_search.calibrate.profile import Profile
    from polykv_search.data import load_samples, spread_over_tasks
    from polykv_search.errors import ConfigError
    from polykv_search.evaluate.methods import build_methods
    from polykv_search.evaluate.report import summarize, write_report
    from polykv_search.evaluate.run import evaluate as run_evaluation
    from polykv_search.models import load_model
    from polykv_search.plan import PlanFile, check_matches_model
    from polykv_search.policies import DEFAULT_POLICIES, check_policy_names

    plan_files = [(path.stem, PlanFile.load(path)) for path in (plan or [])]
    if budgets:
        grid = parse_int_list(budgets, option="--budgets")
        if any(b < 1 for b in grid):
            raise ConfigError(f"--budgets {budgets!r}: budgets must be at least 1 token per layer")
        plan_files = [(name, only_budgets(name, f, grid)) for name, f in plan_files]
    else:
        from_plans = sorted({p.average_budget for _, f in plan_files for p in f.plans})
        grid = [int(b) if float(b).is_integer() else b for b in from_plans] or list(DEFAULT_BUDGETS)
    uniform = check_policy_names(parse_str_list(policies)) if policies else list(DEFAULT_POLICIES)
    check_policy_names([allocator_policy])
    mapping = parse_column_map(column_map)
    sources = data or [DEFAULT_EVAL]
    samples = [s for source in sources for s in load_samples(source, column_map=mapping)]
    samples = spread_over_tasks(samples, max_samples)
    out_dir = out or Path("outputs") / model_slug(model) / "eval"
    profile_path = profile or Path("outputs") / model_slug(model) / "profile.safetensors"
    loaded_profile = Profile.load(profile_path) if (profile or profile_path.exists()) else None

    with err_console.status(f"loading {model}"):
        lm = load_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code, revision=revision)
    for _, plan_file in plan_files:
        check_matches_model(plan_file, lm.info)
    methods = build_methods(lm.info, budgets=grid, uniform_policies=uniform, allocators=("pyramidkv", "cake"),
                            allocator_policy=allocator_policy, profile=loaded_profile, plans=plan_files)
    if loaded_profile is None:
        err_console.print(f"note: no profile at {profile_path}; CAKE is left out (run calibrate or pass --profile)")
    columns = (TextColumn("[bold]evaluate"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn(f"{len(methods.methods) + 1} methods per sample, one prefill each"))
    with Progress(*columns, console=err_console) as bar:
        task = bar.add_task("", total=len(samples))
        results = run_evaluation(lm, samples, methods, out_dir=out_dir, resume=resume, with_kl=kl,
                                 batch_size=batch_size, max_context_tokens=max_context,
                                 progress=lambda done, total: bar.update(task, completed=done))
    summary = summarize(results, methods.methods)
    title = f"{lm.info.model_id} on {', '.join(Path(s).name for s in sources)}"
    paths = write_report(summary, results, out_dir, title=title)
    if as_json:
        typer.echo(json.dumps({k: str(v) for k, v in paths.items()} | {"recovery": summary["recovery"]}))
        return
    from polykv_search.evaluate.report import markdown

    err_console.print(markdown(summary), markup=False, highlight=False)
    for kind, path in paths.items():
        typer.echo(f"{kind}: {path}")


def only_budgets(name: str, plan_file: PlanFile, grid: list[int]) -> PlanFile:
    """The plan file's rungs at the asked budgets: a rung with no baseline beside it would only cost time."""
    from polykv_search.errors import ConfigError

    kept = [p for p in plan_file.plans if p.average_budget in grid]
    if not kept:
        have = ", ".join(f"{p.average_budget:g}" for p in plan_file.plans)
        raise ConfigError(f"plan {name} has budgets {have}, none of them in --budgets "
                          f"{','.join(map(str, grid))}; add one of its budgets or leave --budgets out")
    return replace(plan_file, plans=tuple(kept))
