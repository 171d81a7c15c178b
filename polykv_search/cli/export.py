"""`polykv-search export`: one rung of a plan file as another engine's configuration.

    polykv-search export outputs/smollm2-135m/plan.json --to trtllm --out kv_cache_config.yaml --budget 256
    polykv-search export plan.json --to duo-attention --out duo_pattern/ --context 4096
    polykv-search export plan.json --out deploy/plan.json                # kvpress (default): validated copy
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from polykv_search.cli import app
from polykv_search.cli.options import JsonOpt
from polykv_search.export import DUO_ATTENTION, KVPRESS, TARGETS, TRTLLM, export_plan

ExportPlanArg = Annotated[Path, typer.Argument(help="Plan file (JSON) to export.", show_default=False)]


@app.command("export")
def export_cmd(
    plan: ExportPlanArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="File (kvpress: .json; trtllm: .json or .yaml) or, for "
                                      "duo-attention, the pattern folder.")],
    to: Annotated[str, typer.Option("--to", help=f"Target engine: {', '.join(TARGETS)}.")] = KVPRESS,
    budget: Annotated[float | None, typer.Option("--budget", "-b", help="The rung to export (needed when the file "
                                                 "holds several budgets).")] = None,
    context: Annotated[int | None, typer.Option(help="Longest prompt served, in tokens: entries keeping at least "
                                                "this many keep their whole context (DuoAttention full heads; "
                                                "TensorRT-LLM's window of such layers: the model's max context)."
                                                )] = None,
    sliding_window: Annotated[int | None, typer.Option(help="trtllm: the window of the model's sliding-window "
                                                       "layers (its config's sliding_window).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write a plan as kvpress, TensorRT-LLM (KvCacheConfig) or DuoAttention reads it; refuse what it cannot run."""
    path = export_plan(plan, to=to, out=out, budget=budget, context=context, sliding_window=sliding_window)
    if as_json:
        typer.echo(json.dumps({"target": to, "out": str(path)}))
        return
    if to == TRTLLM:
        typer.echo(f"TensorRT-LLM kv_cache_config: {path}")
    elif to == DUO_ATTENTION:
        typer.echo(f"DuoAttention pattern: {path} (config.json, full_attention_heads.tsv)")
    else:
        typer.echo(f"plan: {path}")
