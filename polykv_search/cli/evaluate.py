"""`polykv-search evaluate`: full cache vs every uniform policy vs PyramidKV, CAKE and Ada-KV vs your plans, with R.

    polykv-search evaluate --plan outputs/smollm2-135m/plan.json           # budgets taken from the plan
    polykv-search evaluate --budgets 64,128,256,512 --max-samples 20       # baselines only
    polykv-search evaluate --model gemma3-270m --plan p.json --data calibration_data/eval_alt.jsonl --resume
    polykv-search evaluate --plan trtllm.json --target trtllm              # R against TensorRT-LLM's one window too
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from polykv_search.cli import app
from polykv_search.cli.errors import err_console
from polykv_search.cli.options import (
    DEFAULT_DEVICE,
    DEFAULT_MODEL,
    ColumnMapOpt,
    DataOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    MaxContextOpt,
    ModelOpt,
    QuestionAwareOpt,
    RevisionOpt,
    TrustOpt,
    model_slug,
    parse_allocators,
    parse_budget_list,
    parse_column_map,
    parse_str_list,
)
from polykv_search.cli.render import progress_bars
from polykv_search.errors import ConfigError

DEFAULT_EVAL = "calibration_data/eval.jsonl"


@app.command()
def evaluate(
    model: ModelOpt = DEFAULT_MODEL,
    plan: Annotated[list[Path] | None, typer.Option("--plan", "-p", help="Plan file(s) to score; repeatable.")] = None,
    data: DataOpt = None,
    budgets: Annotated[str | None, typer.Option(help="Budgets to compare at (default: the plans' budgets, "
                                                "else 64,128,256,512); plan rungs at other budgets are skipped.")] = None,
    policies: Annotated[str | None, typer.Option(help="Uniform policies to compare (default: the twelve default "
                                                 "ones).")] = None,
    allocators: Annotated[str, typer.Option(help="Known allocators to compare with: pyramidkv and cake (a budget per "
                                            "layer), adakv (per KV head, from each sample's scores), or none.")] =
    "pyramidkv,cake,adakv",
    allocator_policy: Annotated[str, typer.Option(help="Policy used by the allocators.")] = "snapkv",
    target: Annotated[list[str] | None, typer.Option(help="A plan made for an engine, as NAME=TARGET (NAME: the "
                                                     "plan file's stem) or TARGET for every --plan (trtllm, "
                                                     "duo-attention): its R against the engine's own setting "
                                                     "(uniform streaming at that budget) too; repeatable.")] = None,
    profile: Annotated[Path | None, typer.Option(help="Profile for CAKE's signals (default: "
                                                 "outputs/<model>/profile.safetensors if present).")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (default: outputs/<model>/eval)")] = None,
    max_samples: Annotated[int | None, typer.Option(min=1, help="Use N samples, taken in turn from each task.")] = None,
    max_context: MaxContextOpt = None,
    kl: Annotated[bool, typer.Option("--kl/--no-kl", help="Also score KL to the full cache.")] = True,
    batch_size: Annotated[int, typer.Option(help="Methods decoded together per batch.")] = 16,
    column_map: ColumnMapOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run.")] = False,
    question_aware: QuestionAwareOpt = False,
    device: DeviceOpt = DEFAULT_DEVICE,
    dtype: DtypeOpt = "auto",
    trust_remote_code: TrustOpt = False,
    revision: RevisionOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Score the full cache, uniform policies, PyramidKV, CAKE, Ada-KV and plans on held-out data; report R."""
    # imported here, as in every command: the library loads torch, transformers and kvpress (about 4 s)
    import polykv_search as pk

    profile_path = profile or Path("outputs") / model_slug(model) / "profile.safetensors"
    out_dir = out or Path("outputs") / model_slug(model) / "eval"
    with progress_bars() as progress:
        report = pk.evaluate(model, data or [DEFAULT_EVAL], plans=plan or [], targets=parse_targets(target, plan),
                             budgets=parse_budget_list(budgets, option="--budgets") if budgets else None,
                             policies=parse_str_list(policies) if policies else None,
                             allocators=parse_allocators(allocators), allocator_policy=allocator_policy,
                             profile=profile_path if (profile or profile_path.exists()) else None, out_dir=out_dir,
                             max_samples=max_samples, max_context_tokens=max_context, with_kl=kl,
                             batch_size=batch_size, column_map=parse_column_map(column_map), resume=resume,
                             device=device, dtype=dtype, trust_remote_code=trust_remote_code, revision=revision,
                             progress=progress, question_aware=question_aware)
    if profile is None and not profile_path.exists() and "cake" in parse_allocators(allocators):
        err_console.print(f"note: no profile at {profile_path}; CAKE is left out (run calibrate or pass --profile)")
    if as_json:
        typer.echo(json.dumps({k: str(v) for k, v in report.files.items()}
                              | {"recovery": [r.__dict__ for r in report.recovery]}))
        return
    err_console.print(report.markdown(), markup=False, highlight=False)
    for kind, path in report.files.items():
        typer.echo(f"{kind}: {path}")


def parse_targets(values: list[str] | None, plans: list[Path] | None) -> dict[str, str]:
    """--target values as plan name -> target: NAME=TARGET, or TARGET alone for every --plan (named by its stem)."""
    if values and not plans:
        raise ConfigError(f"--target {values[0]} marks a plan made for an engine; give the plan with --plan")
    targets: dict[str, str] = {}
    for value in values or []:
        name, sep, target = value.partition("=")
        if sep:
            targets[name.strip()] = target.strip()
        else:
            targets.update({path.stem: value.strip() for path in plans or []})
    return targets
