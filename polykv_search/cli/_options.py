"""Options shared by several commands, as Annotated aliases, and parsers for comma lists."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from polykv_search.errors import ConfigError
from polykv_search.models.embedded import DEFAULT_MODEL

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Embedded alias (smollm2-135m, gemma3-270m), a .gguf "
                                       "file, a local model folder, or a hub id.")]
DeviceOpt = Annotated[str, typer.Option(help="cpu, cuda, or auto (accelerate's device map across GPUs).")]
DtypeOpt = Annotated[str, typer.Option(help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16.")]
TrustOpt = Annotated[bool, typer.Option("--trust-remote-code", help="Allow the model's own code (off by default).")]
RevisionOpt = Annotated[str | None, typer.Option(help="Hub revision (commit, tag or branch) of --model.")]
DataOpt = Annotated[list[str] | None, typer.Option("--data", "-d", help="JSON/JSONL/parquet file, folder, or hub id; "
                                                   "repeat for several.")]
ColumnMapOpt = Annotated[str | None, typer.Option(help="Rename columns to the LongBench schema, e.g. "
                                                  "'question=input,passage=context'.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
WeightingOpt = Annotated[str, typer.Option(help="How calibration samples combine: mean (plain mean of the costs) or "
                                           "equal (each sample scaled by its own cost level first, so every "
                                           "sample counts the same).")]

__all__ = ["DEFAULT_MODEL", "ColumnMapOpt", "DataOpt", "DeviceOpt", "DtypeOpt", "JsonOpt", "ModelOpt",
           "RevisionOpt", "TrustOpt", "WeightingOpt", "parse_column_map", "parse_int_list", "parse_str_list",
           "model_slug"]


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


def model_slug(model: str) -> str:
    """A folder name for a model spec: its alias, file stem or last path part."""
    name = Path(model.rstrip("/")).name
    return name[:-5] if name.endswith(".gguf") else name
