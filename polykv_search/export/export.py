"""`export_plan`: one call from a plan file to the file (or folder) an engine reads, for every target.

    kvpress         the plan file itself, validated (our PlanPress reads it); with `budget`, that rung only
    trtllm          {"kv_cache_config": {"max_attention_window": [...], "sink_token_length": S}} (.json or .yaml)
    duo-attention   a pattern folder: config.json (sink_size, recent_size) + full_attention_heads.tsv
"""

from __future__ import annotations

import logging
from pathlib import Path

from polykv_search.export.duo_attention import duo_attention_pattern, provenance
from polykv_search.export.entries import DUO_ATTENTION, KVPRESS, check_target, pick_plan
from polykv_search.export.trtllm import trtllm_kv_cache_config
from polykv_search.io import check_writable, write_atomic
from polykv_search.plan import PlanFile

logger = logging.getLogger(__name__)


def export_plan(plan: str | Path | PlanFile, *, to: str = KVPRESS, out: str | Path, budget: float | None = None,
                context: int | None = None, sliding_window: int | None = None) -> Path:
    """Write one rung of `plan` (a plan file or its path) as target `to` reads it at `out`; returns `out`.

    `budget` picks the rung (needed when the file holds several, except for kvpress, which copies the ladder).
    `context` (tokens): the prompt length the engine serves: it picks the rung where the file has one per range
    of prompt lengths, and entries keeping at least this many tokens keep their whole context (a DuoAttention full
    head; TensorRT-LLM's window of such a layer). `sliding_window`: TensorRT-LLM's window of the model's
    sliding-window layers. ExportError names the layers and heads a target cannot express.
    """
    check_target(to)
    source = None if isinstance(plan, PlanFile) else Path(plan)
    plan_file = plan if isinstance(plan, PlanFile) else PlanFile.load(plan)
    out = Path(out)
    if to != DUO_ATTENTION:  # a file: a folder, a read-only place or a path under a file is refused before any work
        check_writable(out, example="plan.json" if to == KVPRESS else "kv_cache_config.yaml")
    if to == KVPRESS:
        if budget is not None:  # that budget's rungs, one per range of prompt lengths where the file has several
            return PlanFile(model=plan_file.model, plans=tuple(plan_file.rungs_for(budget)),
                            question_aware=plan_file.question_aware).save(out)
        return write_atomic(out, source.read_bytes()) if source is not None else plan_file.save(out)
    chosen = pick_plan(plan_file, budget, context)
    if to == DUO_ATTENTION:
        pattern = duo_attention_pattern(chosen, model=plan_file.model, context=context)
        logger.info("duo-attention: sink %d, recent %d, %.0f%% streaming heads", pattern.sink_size,
                    pattern.recent_size, 100 * pattern.head_compression_ratio)
        return pattern.write(out, **provenance(chosen, plan_file.model, context))
    config = trtllm_kv_cache_config(chosen, model=plan_file.model, context=context, sliding_window=sliding_window)
    header = (f"TensorRT-LLM LLM API options from polykv-search: {plan_file.model.id} at average budget "
              f"{chosen.average_budget:g}\n{config.python()}")
    return config.write(out, header=header)
