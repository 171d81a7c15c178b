"""Options shared by several commands, as Annotated aliases, and parsers for comma lists."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from polykv_search.errors import ConfigError
from polykv_search.io import check_writable
from polykv_search.models import DEFAULT_DEVICE, DEFAULT_MODEL, model_slug
from polykv_search.plan.names import COST_NAMES, METRICS, SOLVERS, WEIGHTINGS



def choices(values: tuple[str, ...]) -> str:
    """An option's metavar listing its values (the library's names, checked by the library with its own message)."""
    return "[" + "|".join(values) + "]"


ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Embedded alias (smollm2-135m, gemma3-270m), a .gguf "
                                       "file, a local model folder, or a hub id.")]
DataOpt = Annotated[list[str] | None, typer.Option("--data", "-d", help="JSON/JSONL/parquet file, folder, or hub id; "
                                                   "repeat for several.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
ProfileOpt = Annotated[Path | None, typer.Option("--profile", help="Profile from calibrate "
                                                 "(default: outputs/<model>/profile.safetensors).")]
OutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Output path (default under outputs/<model>/).")]

GridOpt = Annotated[str | None, typer.Option(help="Calibration budget grid, tokens per layer, e.g. "
                                              "16,32,64,128,256,512,1024,2048 (default: 16,64,256,1024,2048 per KV "
                                              "head, else 16,32,64,128,256,512,1024).")]
# the calibration options a user rarely changes, and the loading options every model-loading command takes
PROBES = "Probes and signals"
LOADING = "Loading"
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow the model's own code (off by default).",
                                        rich_help_panel=LOADING)]
RevisionOpt = Annotated[str | None, typer.Option(help="Hub revision (commit, tag or branch) of --model.",
                                                 rich_help_panel=LOADING)]
ColumnMapOpt = Annotated[str | None, typer.Option(help="Rename columns to the canonical names (LongBench's or "
                                                  "kvpress's load as they are), e.g. 'query=input,passage=context'.",
                                                  rich_help_panel=LOADING)]
MaxContextOpt = Annotated[int | None, typer.Option(help="Truncate prompts (middle) to this many tokens (default: the "
                                                   "model context).", rich_help_panel=LOADING)]
QuestionAwareOpt = Annotated[bool, typer.Option(
    "--question-aware", help="kvpress's second setting: the question is prefilled and compressed with the context "
    "(default: asked after compression, query-agnostic). A plan records the setting it was made for.")]
DeviceOpt = Annotated[str, typer.Option(help="best (cuda when a GPU is visible, else cpu; the line 'device: ...' says "
                                        "which), cpu, cuda, or auto (accelerate's device map across GPUs).")]
DtypeOpt = Annotated[str, typer.Option(help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16.")]

# the optimizer's options, shared by `optimize` and `run`; those a user rarely changes in their own panels
OPTUNA = "Optuna (--solver optuna)"
ILP = "ILP (--solver ilp)"
CONSTRAINTS = "Plan constraints"
SolverOpt = Annotated[str, typer.Option(
    metavar=choices(SOLVERS), help="dp (exact, default), ilp (cvxpy + HiGHS), select (exact plans under several "
    "costs and floors, uniform plans and allocators; the best measured end to end on calibration samples wins) or "
    "optuna (end-to-end search seeded with those candidates).")]
CostOpt = Annotated[str, typer.Option(
    metavar=choices(COST_NAMES), help="Profile cost to minimise: mass_lost, out_err, layer_kl / layer_nll "
    "(profiles from `calibrate --layer-kl`), around_kl (from `calibrate --around`, at its budgets) or head_kl / "
    "head_fisher (from `calibrate --head-kl` / `--head-fisher`: a budget per KV head, a schema-2 plan).")]
MetricOpt = Annotated[str, typer.Option(
    metavar=choices(METRICS), help="select/optuna: end-to-end measure on calibration samples: kl, nll, miss, lost "
    "(1 - exp(-KL) per sample) or task (1 - the task's score of the greedy answer; decodes every candidate).")]
WeightingOpt = Annotated[str, typer.Option(
    metavar=choices(WEIGHTINGS), help="How calibration samples combine: mean (plain mean of the costs) or equal "
    "(each sample scaled by its own cost level first, so every sample counts the same).")]
PoliciesOpt = Annotated[str | None, typer.Option(help="Comma-separated policies (default: all).")]
FloorOpt = Annotated[int, typer.Option(help="Fewest tokens a layer may keep.", rich_help_panel=CONSTRAINTS)]
CapOpt = Annotated[int | None, typer.Option(help="Most tokens a layer may keep (default: the longest calibration "
                                            "context).", rich_help_panel=CONSTRAINTS)]
MaxPoliciesOpt = Annotated[int | None, typer.Option(help="At most this many distinct policies.",
                                                    rich_help_panel=CONSTRAINTS)]
TieOpt = Annotated[list[str] | None, typer.Option(help="Layers forced to one policy and budget, e.g. '0,1,2'; "
                                                  "repeatable.", rich_help_panel=CONSTRAINTS)]
OnlyOpt = Annotated[list[str] | None, typer.Option(help="Restrict a policy to layers, e.g. 'streaming=0,1'; "
                                                   "repeatable.", rich_help_panel=CONSTRAINTS)]
NTrialsOpt = Annotated[int, typer.Option(help="optuna: trials (seeds included).", rich_help_panel=OPTUNA)]
StorageOpt = Annotated[str | None, typer.Option(help="optuna: journal:PATH or an RDB URL; shared by processes and "
                                                "machines, resumable after a kill.", rich_help_panel=OPTUNA)]

__all__ = ["CONSTRAINTS", "DEFAULT_DEVICE", "DEFAULT_MODEL", "ILP", "LOADING", "OPTUNA", "PROBES", "CapOpt",
           "ColumnMapOpt", "CostOpt", "DataOpt", "DeviceOpt", "DtypeOpt", "FloorOpt", "GridOpt", "JsonOpt",
           "MaxContextOpt", "MaxPoliciesOpt",
           "MetricOpt", "ModelOpt", "NTrialsOpt", "OnlyOpt", "OutOpt", "PoliciesOpt", "ProfileOpt", "RevisionOpt",
           "SolverOpt", "StorageOpt", "TieOpt", "TrustOpt", "WeightingOpt", "check_out_file", "choices", "given",
           "model_slug", "parse_allowed", "parse_budget_list", "parse_column_map", "parse_int_list", "parse_str_list",
           "parse_tied"]


def given(ctx: typer.Context, name: str) -> bool:
    """Whether option `name` was given (command line or environment), not left at its default."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")


def check_out_file(path: Path | None, *, option: str = "--out", example: str = "plan.json") -> Path | None:
    """An output file path, refused in one line (before any work) when it names a folder, lies under a file, or its
    folder cannot take a new file (read-only or immutable)."""
    if path is None:
        return None
    return check_writable(path, option=option, example=example)


def parse_budget_list(text: str, *, option: str = "--budget") -> list[float]:
    """Average budgets from '128,256,512' (fractions allowed), each at least 1 token per layer, none twice."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{option} {text!r} is not a comma-separated list of numbers, e.g. 128,256,512") from None
    if not values or any(not v >= 1 for v in values):
        raise ConfigError(f"{option} {text!r}: budgets must be at least 1 token per layer")
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:
        raise ConfigError(f"{option} {text!r} gives {', '.join(f'{v:g}' for v in twice)} more than once; give each "
                          "budget once (a plan file holds one plan per budget)")
    return [int(v) if v.is_integer() else v for v in values]


def parse_tied(groups: list[str] | None) -> tuple[tuple[int, ...], ...] | None:
    """--tie '0,1,2' (repeatable) as groups of layer indices."""
    if not groups:
        return None
    return tuple(tuple(parse_int_list(group, option="--tie")) for group in groups)


def parse_allowed(items: list[str] | None) -> dict[str, list[int]] | None:
    """--only 'streaming=0,1' (repeatable) as policy -> layers."""
    if not items:
        return None
    allowed = {}
    for item in items:
        name, sep, layers = item.partition("=")
        if not sep or not name.strip():
            raise ConfigError(f"--only {item!r} is not of the form policy=layers, e.g. 'streaming=0,1'")
        allowed[name.strip()] = parse_int_list(layers, option="--only")
    return allowed


def parse_int_list(text: str, *, option: str) -> list[int]:
    try:
        values = [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise ConfigError(f"{option} {text!r} is not a comma-separated list of integers, e.g. 16,32,64") from None
    if not values:
        raise ConfigError(f"{option} is empty; give a comma-separated list of integers, e.g. 16,32,64")
    return values


def parse_str_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def parse_allocators(text: str) -> list[str]:
    """--allocators: a comma list, or "none" (or nothing) for no allocator."""
    return [] if text.strip().lower() == "none" else parse_str_list(text)


def parse_column_map(text: str | None) -> dict[str, str] | None:
    if not text:
        return None
    mapping = {}
    for pair in parse_str_list(text):
        source, sep, target = pair.partition("=")
        if not sep or not source or not target:
            raise ConfigError(f"--column-map entry {pair!r} is not of the form source=target, "
                              "e.g. 'question=input'")
        mapping[source.strip()] = target.strip()
    return mapping
