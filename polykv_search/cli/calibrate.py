"""`polykv-search calibrate`: measure per-layer signals and policy cost curves on calibration data.

    polykv-search calibrate                                   # embedded SmolLM2, shipped calib split
    polykv-search calibrate --model gemma3-270m --resume      # continue an interrupted run
    polykv-search calibrate --model ./my-model --data longbench/qasper.jsonl --grid 64,128,256,512
    polykv-search calibrate --shard 2/4 --device cuda             # every 4th sample from the 2nd (docs/distributed.md)
    polykv-search merge-profiles outputs/smollm2-135m/shard-*-of-4/profile.safetensors -o merged.safetensors
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
    PROBES,
    ColumnMapOpt,
    DataOpt,
    DeviceOpt,
    DtypeOpt,
    GridOpt,
    JsonOpt,
    MaxContextOpt,
    ModelOpt,
    QuestionAwareOpt,
    RevisionOpt,
    TrustOpt,
    check_out_file,
    parse_column_map,
    parse_int_list,
    parse_str_list,
)
from polykv_search.cli.render import profile_table, progress_bars
from polykv_search.errors import ConfigError

DEFAULT_DATA = "calibration_data/calib.jsonl"


@app.command()
def calibrate(
    model: ModelOpt = DEFAULT_MODEL,
    data: DataOpt = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (default: outputs/<model>)")] = None,
    policies: Annotated[str | None, typer.Option(help="Comma-separated policies (default: the twelve default ones; "
                                                 "docs/commands.md, Policies).")] = None,
    grid: GridOpt = None,
    budgets: Annotated[str | None, typer.Option("--budgets", hidden=True, help="The old name of --grid.")] = None,
    window: Annotated[int, typer.Option(help="Observation window (queries) for CAKE's entropy/variance.",
                                        rich_help_panel=PROBES)] = 64,
    max_samples: Annotated[int | None, typer.Option(min=1, help="Use N samples, taken in turn from each task.")] = None,
    max_context: MaxContextOpt = None,
    column_map: ColumnMapOpt = None,
    layer_kl: Annotated[bool, typer.Option("--layer-kl", help="Slower: also measure, per layer, policy and budget, "
                                           "the KL to the full cache over the answer with only that layer "
                                           "compressed, and the rise of the answer's NLL "
                                           "(layers x policies x budgets batched forwards per sample; "
                                           "a shorter --grid or --policies list makes it cheaper). "
                                           "`optimize --cost layer_kl|layer_nll` uses them.")] = False,
    head_kl: Annotated[bool, typer.Option("--head-kl", help="Slower: the KL to the full cache with only one KV head "
                                          "compressed, per layer, KV head, policy and budget (layers x heads x "
                                          "policies x budgets forwards per sample). `optimize --cost head_kl` "
                                          "allocates per KV head from them.")] = False,
    head_fisher: Annotated[bool, typer.Option("--head-fisher", help="The per-KV-head cost of --head-kl estimated "
                                              "to second order from --draws backward passes over the answer "
                                              "(no forward per head: a few times a plain calibrate). "
                                              "`optimize --cost head_fisher` allocates per KV head from it.")] = False,
    draws: Annotated[int, typer.Option(help="--head-fisher: answer-token draws (backward passes) per "
                                       "sample.", rich_help_panel=PROBES)] = 16,
    probe_above: Annotated[float, typer.Option(help="--head-fisher: probe exactly (as --head-kl does) the cells "
                                               "whose estimate is above this mean KL per answer token, where "
                                               "the second order under-counts; inf probes none.",
                                               rich_help_panel=PROBES)] = 0.003,
    probe_share: Annotated[float, typer.Option(help="--head-fisher: probe at most this share of a sample's cells, "
                                               "the largest estimates first (bounds the probes' time).",
                                               rich_help_panel=PROBES)] = 0.033,
    around: Annotated[str | None, typer.Option(help="Slower: per layer, policy and budget, the KL with every other "
                                               "layer at a uniform background of each of these average budgets "
                                               "(e.g. 64,128,256,512; one background per budget, a prefill per "
                                               "sample to choose it). `optimize --cost around_kl` uses them at "
                                               "those budgets.")] = None,
    around_policy: Annotated[str | None, typer.Option(help="--around: the background's policy (default: the "
                                                      "uniform policy keeping most of the output distribution "
                                                      "on the calibration samples).",
                                                      rich_help_panel=PROBES)] = None,
    around_plan: Annotated[Path | None, typer.Option(help="--around: probe around this plan's rungs instead of a "
                                                     "uniform policy (default budgets: the plan's), so that "
                                                     "`optimize --cost around_kl` refines the plan; its "
                                                     "policies must be among --policies.",
                                                     rich_help_panel=PROBES)] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the checkpoints of an interrupted run.")] = False,
    question_aware: QuestionAwareOpt = False,
    shard: Annotated[str | None, typer.Option(help="K/N: calibrate only samples i (of the selection, from 0) with "
                                              "i mod N = K-1, into <out>/shard-K-of-N/; run the N shards anywhere, "
                                              "then `merge-profiles` them.")] = None,
    device: DeviceOpt = DEFAULT_DEVICE,
    dtype: DtypeOpt = "auto",
    trust_remote_code: TrustOpt = False,
    revision: RevisionOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Run the model on calibration data; write a profile of per-layer signals and policy cost curves."""
    # imported here, as in every command: the library loads torch, transformers and kvpress (about 4 s)
    import polykv_search as pk
    from polykv_search.calibration.figures import signal_heatmap

    config = pk.CalibrationConfig(
        **({"policies": tuple(parse_str_list(policies))} if policies else {}),
        **({"budgets": tuple(parse_int_list(grid_of(grid, budgets), option="--grid"))} if grid or budgets else {}),
        window=window, max_context_tokens=max_context, layer_kl=layer_kl, head_kl=head_kl,
        head_fisher=head_fisher, draws=draws, probe_above=probe_above, probe_share=probe_share,
        around=tuple(parse_int_list(around, option="--around")) if around else (),
        around_policy=around_policy, around_plan=str(around_plan) if around_plan else None,
        question_aware=question_aware).validated()
    with progress_bars() as progress:
        run = pk.calibrate(model, data or [DEFAULT_DATA], config=config, out_dir=out, max_samples=max_samples,
                           column_map=parse_column_map(column_map), resume=resume, device=device, dtype=dtype,
                           trust_remote_code=trust_remote_code, revision=revision, progress=progress, shard=shard)
    heatmap = signal_heatmap(run.profile, run.path.parent / "signals.png")
    if as_json:
        typer.echo(json.dumps({"profile": str(run.path), "heatmap": str(heatmap), "samples": run.profile.num_samples,
                               "seconds": round(run.seconds, 2)}))
        return
    err_console.print(profile_table(run.profile))
    skipped = sum(r.skipped is not None for r in run.results)
    truncated = sum(r.truncated for r in run.results)
    err_console.print(f"{run.profile.num_samples} samples in {run.seconds:.0f} s"
                      + (f", {skipped} skipped" if skipped else "") + (f", {truncated} truncated" if truncated else ""))
    typer.echo(f"profile: {run.path}")
    typer.echo(f"heatmap: {heatmap}")


def grid_of(grid: str | None, budgets: str | None) -> str | None:
    """--grid, or its old name --budgets; both: they must agree."""
    if grid and budgets and grid != budgets:
        raise ConfigError(f"--grid {grid} and --budgets {budgets} name the same calibration grid; give --grid alone")
    return grid or budgets


@app.command("merge-profiles")
def merge_profiles(
    profiles: Annotated[list[Path], typer.Argument(help="Profiles of the same model, policies and options: the "
                                                   "shards of one `calibrate --shard K/N` split, or profiles of "
                                                   "the same samples on disjoint budget grids.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Merged profile file.")],
    allow_partial: Annotated[bool, typer.Option("--allow-partial", help="Shards: merge the shards given even if "
                                                "some of the N are missing (the result can be merged with them "
                                                "later).")] = False,
) -> None:
    """Join the shards of a split calibration, in sample order, or profiles calibrated on disjoint budget grids
    into one on the union grid (no re-measuring)."""
    # imported here: the library loads torch (seconds), which --help does not need
    from polykv_search.calibration.merge import merge_profiles as merge

    check_out_file(out, example="profile.safetensors")
    merged = merge(profiles, allow_partial=allow_partial)
    path = merged.save(out)
    partial = merged.meta.shard
    shards = f"; shards {','.join(map(str, partial['indices']))} of {partial['count']}" if partial else ""
    typer.echo(f"profile: {path} ({merged.num_samples} samples{shards}; budgets "
               f"{','.join(map(str, merged.budgets))}; {', '.join(merged.cost_kinds)})")
