"""DuoAttention: every KV head either keeps its whole context (a retrieval head) or is a StreamingLLM head keeping
`sink_size` first and `recent_size` last context tokens, one sink and one window for the whole model.

The export is DuoAttention's pattern folder (https://arxiv.org/abs/2410.10819, mit-han-lab/duo-attention
`attn_patterns/`), the files kvpress's DuoAttentionPress reads: `full_attention_heads.tsv` (one row per layer, one
tab-separated column per KV head, 1 = full, 0 = streaming) and `config.json` (`sink_size`, `recent_size`). With
`head_compression_ratio` = the share of streaming heads (written into config.json too), the press makes exactly
the 0 heads streaming:

    DuoAttentionPress(head_compression_ratio=r)   # sink_size, recent_size and the mask from the folder

A plan fits when every compressed head is `streaming` with one n_sink and one budget (sink = n_sink, recent =
budget - n_sink >= 1) and every other head keeps its whole context: no policy, or (given `context`, the longest
prompt the engine serves) a budget of at least `context`.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polykv_search import __version__
from polykv_search.errors import PlanError
from polykv_search.export.entries import (
    DUO_ATTENTION,
    STREAMING,
    check_tokens,
    head_entries,
    keeps_all,
    n_sink,
    refusal,
)
from polykv_search.io import write_atomic
from polykv_search.plan import Plan, PlanModel

HEADS_FILE = "full_attention_heads.tsv"
CONFIG_FILE = "config.json"


@dataclass(frozen=True)
class DuoPattern:
    """A DuoAttention pattern: the shared StreamingLLM sink and window, and which KV heads keep everything."""

    sink_size: int
    recent_size: int
    full: tuple[tuple[bool, ...], ...]  # (L, H_kv): True where a KV head keeps its whole context

    @property
    def head_compression_ratio(self) -> float:
        """The share of KV heads (over every layer) that are streaming: DuoAttentionPress's parameter."""
        cells = [f for row in self.full for f in row]
        return sum(not f for f in cells) / len(cells)

    def tsv(self) -> str:
        return "".join("\t".join("1" if f else "0" for f in row) + "\n" for row in self.full)

    def config(self, **extra: Any) -> dict[str, Any]:
        return {"sink_size": self.sink_size, "recent_size": self.recent_size,
                "head_compression_ratio": self.head_compression_ratio, **extra}

    def write(self, folder: str | Path, **extra: Any) -> Path:
        """Write the folder: the heads file first, config.json last (a folder without it is not a pattern)."""
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise PlanError(f"--out {folder} is a file; a DuoAttention pattern is a folder, give a folder path")
        write_atomic(folder / HEADS_FILE, self.tsv())
        write_atomic(folder / CONFIG_FILE, json.dumps(self.config(**extra), indent=2) + "\n")
        return folder

    @classmethod
    def read(cls, folder: str | Path) -> DuoPattern:
        """A pattern folder as written by `write` (or DuoAttention's own, scores >= 0.5 read as full)."""
        folder = Path(folder)
        try:
            config = json.loads((folder / CONFIG_FILE).read_text())
            rows = [line.split("\t") for line in (folder / HEADS_FILE).read_text().splitlines() if line.strip()]
            full = tuple(tuple(float(v) >= 0.5 for v in row) for row in rows)
            return cls(sink_size=int(config["sink_size"]), recent_size=int(config["recent_size"]), full=full)
        except (OSError, ValueError, KeyError) as exc:
            raise PlanError(f"{folder} is not a DuoAttention pattern folder ({exc}); it needs {CONFIG_FILE} with "
                            f"sink_size and recent_size and {HEADS_FILE}") from exc


def duo_attention_pattern(plan: Plan, *, model: PlanModel, context: int | None = None) -> DuoPattern:
    """The DuoAttention pattern of `plan`, or ExportError naming the heads it cannot express and why.

    Sliding-window layers are full heads in the pattern: the architecture fixes their cache.
    """
    check_tokens(context, "--context")
    heads = model.num_kv_heads
    full = [[True] * heads for _ in range(model.num_layers)]
    windows: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (n_sink, budget) -> its (layer, head)
    other: dict[str, list[tuple[int, int | None]]] = {}  # policy -> its (layer, head)
    no_recent: list[tuple[int, int | None]] = []
    for layer in plan.layers:
        if layer.sliding_window:
            continue
        for h, entry in enumerate(head_entries(layer, heads)):
            if keeps_all(entry, context):
                continue
            full[layer.index][h] = False
            if entry.policy != STREAMING:
                other.setdefault(str(entry.policy), []).append((layer.index, h))
            elif entry.budget <= n_sink(entry):
                no_recent.append((layer.index, h))
            else:
                windows.setdefault((n_sink(entry), int(entry.budget)), []).append((layer.index, h))
    counts = Counter({key: len(slots) for key, slots in windows.items()})
    shared = min(counts, key=lambda key: (-counts[key], key[1], key[0])) if counts else (0, 0)
    problems = {f"use {policy}, not streaming (DuoAttention's compressed heads are StreamingLLM)": slots
                for policy, slots in other.items()}
    problems["keep no more tokens than their sinks (DuoAttention needs a recent window of at least 1)"] = no_recent
    larger = False
    for (sinks, budget), slots in sorted(windows.items()):
        if (sinks, budget) != shared:
            problems[f"keep {budget} tokens with {sinks} sinks, not the shared {shared[1]} with {shared[0]}"] = slots
            larger |= budget > shared[1]
    if any(problems.values()):
        hint = ("re-run `polykv-search optimize --target duo-attention`, or export with --to kvpress")
        if larger and context is None:
            hint = ("heads keeping at least the longest prompt served export as full heads: pass --context N; or "
                    + hint)
        raise refusal(plan, DUO_ATTENTION, problems, hint)
    sinks, budget = shared
    return DuoPattern(sink_size=sinks, recent_size=budget - sinks, full=tuple(tuple(row) for row in full))


def provenance(plan: Plan, model: PlanModel, context: int | None) -> dict[str, Any]:
    """What config.json records besides the pattern (DuoAttention and kvpress read only sink_size and recent_size)."""
    return {"model": model.id, "num_layers": model.num_layers, "num_kv_heads": model.num_kv_heads,
            "average_budget": plan.average_budget, "context": context, "producer": f"polykv-search {__version__}"}
