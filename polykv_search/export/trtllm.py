"""TensorRT-LLM: a StreamingLLM window per layer, as the KvCacheConfig of its LLM API:

    KvCacheConfig(max_attention_window=[W_0, ..., W_{L-1}], sink_token_length=S)

W_l is the tokens layer l keeps, sinks included (the layer's budget), S the one n_sink of every streaming layer.
The file is the `kv_cache_config` block of TensorRT-LLM's LLM API options (JSON, or YAML for `trtllm-serve
--extra_llm_api_options FILE`). A plan fits when every layer keeps one entry for all its KV heads and each
compressed layer is `streaming` with the same n_sink and a budget above it; a layer keeping its whole context gets
`context` (the model's max context); sliding-window layers get the architecture's `sliding_window`.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polykv_search.errors import MissingPackageError
from polykv_search.export.entries import (
    STREAMING,
    TRTLLM,
    check_tokens,
    head_entries,
    keeps_all,
    n_sink,
    refusal,
)
from polykv_search.io import write_atomic
from polykv_search.plan import Plan, PlanModel

YAML_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class TrtllmKvCacheConfig:
    """The two KvCacheConfig fields a per-layer StreamingLLM plan sets."""

    max_attention_window: tuple[int, ...]  # (L,) tokens kept per layer, sinks included
    sink_token_length: int

    def to_dict(self) -> dict[str, Any]:
        """The LLM API options block: {"kv_cache_config": {...}}."""
        return {"kv_cache_config": {"max_attention_window": list(self.max_attention_window),
                                    "sink_token_length": self.sink_token_length}}

    def python(self) -> str:
        """The equivalent constructor call of tensorrt_llm.llmapi.KvCacheConfig."""
        return (f"KvCacheConfig(max_attention_window={list(self.max_attention_window)}, "
                f"sink_token_length={self.sink_token_length})")

    def write(self, path: str | Path, *, header: str = "") -> Path:
        """JSON, or YAML (with `header` as comments) when the suffix is .yaml / .yml."""
        path = Path(path)
        if path.suffix.lower() not in YAML_SUFFIXES:
            return write_atomic(path, json.dumps(self.to_dict(), indent=2) + "\n")
        try:  # imported here: PyYAML is optional, needed only for a YAML file
            import yaml
        except ImportError as exc:
            raise MissingPackageError(f"writing {path} needs PyYAML: pip install pyyaml (or give a .json "
                                      "path)") from exc
        comments = "".join(f"# {line}\n" for line in header.splitlines())
        return write_atomic(path, comments + yaml.safe_dump(self.to_dict(), default_flow_style=None, sort_keys=False))


def trtllm_kv_cache_config(plan: Plan, *, model: PlanModel, context: int | None = None,
                           sliding_window: int | None = None) -> TrtllmKvCacheConfig:
    """The KvCacheConfig fields of `plan`, or ExportError naming the layers it cannot express and why.

    `context`: the model's max context, the window of a layer keeping its whole context (entries keeping at least
    that many tokens are clamped to it). `sliding_window`: the window of the model's sliding-window layers.
    """
    check_tokens(context, "--context")
    check_tokens(sliding_window, "--sliding-window")
    windows: list[int] = []
    sinks: dict[int, list[tuple[int, int | None]]] = {}
    problems: dict[str, list[tuple[int, int | None]]] = {
        "give their KV heads different entries (TensorRT-LLM's window is per layer)": [],
        "keep no more tokens than their sinks (the window must exceed sink_token_length)": [],
        "keep their whole context: pass --context N (the model's max context) as their window": [],
        "are sliding-window layers: pass --sliding-window N (the model's window) to keep them as they are": [],
    }
    reasons = list(problems)
    for layer in plan.layers:
        if layer.sliding_window:
            if sliding_window is None:
                problems[reasons[3]].append((layer.index, None))
            windows.append(sliding_window or 0)
            continue
        entries = head_entries(layer, model.num_kv_heads)
        if any(e != entries[0] for e in entries):
            problems[reasons[0]].append((layer.index, None))
            windows.append(0)
            continue
        entry = entries[0]
        if keeps_all(entry, context):
            if context is None:
                problems[reasons[2]].append((layer.index, None))
            windows.append(context or 0)
        elif entry.policy != STREAMING:
            problems.setdefault(f"use {entry.policy}, not streaming (TensorRT-LLM keeps StreamingLLM windows)",
                                []).append((layer.index, None))
            windows.append(0)
        elif entry.budget <= n_sink(entry):
            problems[reasons[1]].append((layer.index, None))
            windows.append(0)
        else:
            sinks.setdefault(n_sink(entry), []).append((layer.index, None))
            windows.append(int(entry.budget))
    counts = Counter({s: len(slots) for s, slots in sinks.items()})
    shared = min(counts, key=lambda s: (-counts[s], s)) if counts else 0
    for s, slots in sorted(sinks.items()):
        if s != shared:
            problems[f"use {s} sinks, not the shared {shared} (sink_token_length is one number)"] = slots
    if any(problems.values()):
        raise refusal(plan, TRTLLM, problems, "re-run `polykv-search optimize --target trtllm`, or export with "
                      "--to kvpress")
    return TrtllmKvCacheConfig(max_attention_window=tuple(windows), sink_token_length=shared)
