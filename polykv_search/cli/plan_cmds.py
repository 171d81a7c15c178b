"""`polykv-search schema | validate | baseline`: print the plan schema, check a plan file, write baseline plans.

    polykv-search schema > plan-v2.json
    polykv-search validate outputs/plans/uniform-snapkv.json --model smollm2-135m
    polykv-search validate --seal my-hand-written-plan.json     # check it, then add the checksum readers require
    polykv-search baseline --kind pyramidkv --budget 128,256,512 --profile outputs/smollm2-135m/profile.safetensors
    polykv-search baseline --kind cake --policy snapkv --budget 512 --profile outputs/smollm2-135m/profile.safetensors
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from polykv_search.cli import app
from polykv_search.cli.errors import err_console
from polykv_search.cli.options import RevisionOpt, TrustOpt, check_out_file, parse_int_list
from polykv_search.cli.render import plan_table
from polykv_search.errors import ConfigError
from polykv_search.plan import PLAN_SCHEMA, InvalidPlanError, PlanFile, budgets_beyond_context
from polykv_search.plan.seal import read_unsealed, seal_plan_file

KINDS = ("uniform", "pyramidkv", "cake")

PlanArg = Annotated[Path, typer.Argument(help="Plan file (JSON) to check.", show_default=False)]
OptionalModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="Embedded alias (smollm2-135m, "
                             "gemma3-270m), a .gguf file, a local model folder, or a hub id.")]


@app.command()
def schema() -> None:
    """Print the plan file's JSON Schema (Draft 2020-12) to stdout."""
    typer.echo(json.dumps(PLAN_SCHEMA, indent=2))


@app.command()
def validate(
    plan: PlanArg,
    model: OptionalModelOpt = None,
    revision: RevisionOpt = None,
    trust_remote_code: TrustOpt = False,
    seal: Annotated[bool, typer.Option("--seal", help="For a plan written or edited by hand: check it, then add "
                                       "the checksum of its content, which every reader requires.")] = False,
) -> None:
    """Check a plan file; with --model, also check that it was made for that model. Exit 2 lists every problem."""
    plan_file = read_unsealed(plan)[0] if seal else PlanFile.load(plan)
    if model is not None:
        # imported here: loading a model needs torch and transformers (seconds); a plain check needs neither
        from polykv_search.models import load_model

        info = load_model(model, revision=revision, trust_remote_code=trust_remote_code).info
        plan_file.check_model(info)
        beyond = budgets_beyond_context(plan_file.to_dict(), info)
        if beyond:
            raise InvalidPlanError(source=str(plan), problems=beyond)
    sealed = f"; {seal_plan_file(plan)}" if seal else ""
    budgets = ", ".join(_fmt(b) for b in plan_file.budgets)
    count = len(plan_file.plans)
    typer.echo(f"valid: {count} plan{'s' if count != 1 else ''}, budgets [{budgets}]{sealed}")


@app.command()
def baseline(
    kind: Annotated[str, typer.Option(help="Allocator: uniform, pyramidkv or cake.", show_default=False)],
    budget: Annotated[str, typer.Option(help="Average tokens per layer; comma-separated for a ladder, "
                                        "e.g. 128,256,512.", show_default=False)],
    policy: Annotated[str, typer.Option(help="Registered policy applied on every compressible layer.")] = "snapkv",
    profile: Annotated[Path | None, typer.Option(help="Calibration profile: model geometry and, for cake, the "
                                                 "per-layer entropy and variance.")] = None,
    model: OptionalModelOpt = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Plan file to write "
                                             "(default: outputs/plans/<kind>-<policy>.json).")] = None,
    window: Annotated[int, typer.Option(help="PyramidKV: tokens of the recent window kept on every layer.")] = 64,
    beta: Annotated[float, typer.Option(help="PyramidKV: top-to-bottom steepness (min = (B - window) / beta).")] = 20,
    tau1: Annotated[float, typer.Option(help="CAKE: temperature of the entropy term.")] = 1.0,
    tau2: Annotated[float, typer.Option(help="CAKE: temperature of the variance term.")] = 1.0,
    max_budget: Annotated[int | None, typer.Option(help="Cap on any layer's budget (e.g. the context length); "
                                                   "pyramidkv and cake.")] = None,
    revision: RevisionOpt = None,
    trust_remote_code: TrustOpt = False,
) -> None:
    """Write a baseline plan (or a ladder of them): uniform, PyramidKV or CAKE budgets for one policy."""
    check_out_file(out)
    # imported here: the library loads torch, transformers and kvpress (about 4 s)
    from polykv_search.calibration import Profile
    from polykv_search.io import file_sha256
    from polykv_search.models import load_model
    from polykv_search.optimization import cake_plan, pyramidkv_plan
    from polykv_search.plan import uniform_plan

    if kind not in KINDS:
        raise ConfigError(f"--kind {kind!r} is not one of {', '.join(KINDS)}")
    if (profile is None) == (model is None):
        raise ConfigError("give exactly one of --profile (model geometry from its header) or --model")
    if kind == "cake" and profile is None:
        raise ConfigError("--kind cake needs --profile: CAKE weighs layers by the profile's entropy and variance")
    budgets = list(dict.fromkeys(parse_int_list(budget, option="--budget")))
    loaded = None
    if profile is not None:
        loaded = Profile.load(profile)
        info = loaded.model
    else:
        info = load_model(model, revision=revision, trust_remote_code=trust_remote_code).info
    if kind == "uniform":
        plans = [uniform_plan(info, policy=policy, budget=b) for b in budgets]
    elif kind == "pyramidkv":
        plans = [pyramidkv_plan(info, policy=policy, budget=b, window=window, beta=beta, max_budget=max_budget)
                 for b in budgets]
    else:
        signature = file_sha256(profile)
        plans = [cake_plan(info, loaded, policy=policy, budget=b, tau1=tau1, tau2=tau2, max_budget=max_budget,
                           profile_signature=signature) for b in budgets]
    plan_file = PlanFile.build(info, plans, question_aware=loaded is not None and loaded.meta.question_aware)
    path = plan_file.save(out or Path("outputs/plans") / f"{kind}-{policy}.json")
    err_console.print(plan_table(plan_file, title=f"{kind} baseline, {info.model_id}"))
    typer.echo(str(path))


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)
