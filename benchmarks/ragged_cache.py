"""Benchmark: the memory and decoding speed of a per-head plan in the ragged cache, and of a per-layer plan, each as
a ratio to the uniform dense cache at the same average budget, at batch sizes 1, 4 and 8, side by side in one run.

At each context length the three plans keep the same number of KV entries on average (the budget): the uniform
plan (SnapKV in every layer, kvpress's dense cache), a per-layer plan (PyramidKV's budgets, dense layers of
different lengths) and a per-head plan (a schema-2 plan file's rung, or Ada-KV's per-head budgets from the sample's
own scores, in the ragged cache). The context is prefilled once (the evaluation engine's full prefill); each plan's
cache at batch size B is built from the positions the plan keeps there (what PlanPress keeps: tests/runtime check
it), its B rows holding that context (decoding costs the same whatever the rows hold). For each: the bytes the
cache allocates as a ratio to the entries it holds (right after compression, and after decoding), what the per-head
plan would take in a dense layout (every head padded to its layer's longest), and greedy decoding tokens per second
over the batch (the question, then --decode tokens; the plans take turns, --repeats rounds, the median kept).
`--rss` adds the peak resident memory of a fresh process decoding each plan at batch size 1. Last, a check on
held-out samples: the per-head plan's answers through the evaluation engine and through PlanPress in kvpress's
pipeline (the ragged cache) must be the same.

    python benchmarks/ragged_cache.py                                   # SmolLM2, 2k and 8k tokens, 128 a head
    python benchmarks/ragged_cache.py --per-head-plan outputs/per_head/plans/per_head.json --budget 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from kvpress import KVPressTextGenerationPipeline
from long_context import long_sample
from transformers import DynamicCache

from polykv_search.data import build_prompt, load_samples
from polykv_search.engine import PrefillEngine
from polykv_search.models import load_model
from polykv_search.optimization import adakv_plan, pyramidkv_plan
from polykv_search.plan import Plan, PlanFile, load_plan, uniform_plan
from polykv_search.runtime import PlanPress, polykv_attention
from polykv_search.runtime.ragged import RaggedLayer

KINDS = ("uniform", "per_layer", "per_head")


def cache_bytes(cache) -> int:
    """Bytes every layer of the cache allocates (keys and values)."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, RaggedLayer):
            total += layer.nbytes
        else:
            total += layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
    return total


def padded_bytes(plan: Plan, lm, n: int) -> int:
    """What the plan would allocate in a dense cache: every head of a layer padded to the layer's longest head."""
    per_entry = 2 * lm.info.head_dim * next(lm.model.parameters()).element_size()
    window = lm.info.sliding_window or n
    total = 0
    for layer in plan.layers:
        if layer.sliding_window:
            total += min(n, window) * lm.info.num_kv_heads
            continue
        choices = layer.head_choices(lm.info.num_kv_heads) or [None] * lm.info.num_kv_heads
        total += max(n if c is None else min(c[1], n) for c in choices) * lm.info.num_kv_heads
    return total * per_entry


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def prefill(lm, plan: Plan, context_ids: list[int]):
    cache = DynamicCache(config=lm.model.config)
    with torch.inference_mode(), polykv_attention(lm.model), PlanPress(plan)(lm.model):
        lm.model.model(input_ids=torch.tensor([context_ids]), past_key_values=cache)
    return cache


def decode(lm, cache, question_ids: list[int], n_context: int, steps: int, *, watch_memory: bool = False):
    """The question at its true positions, then `steps` greedy tokens, for every row of the cache's batch; returns
    (seconds of the token loop, peak RSS)."""
    peak = rss_mb()
    batch = cache_batch(cache)
    with torch.inference_mode(), polykv_attention(lm.model):
        positions = torch.arange(n_context, n_context + len(question_ids))[None].expand(batch, -1)
        out = lm.model(input_ids=torch.tensor([question_ids]).expand(batch, -1), past_key_values=cache,
                       position_ids=positions, logits_to_keep=1)
        token = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        position = n_context + len(question_ids)
        start = time.perf_counter()
        for step in range(steps):
            out = lm.model(input_ids=token, past_key_values=cache,
                           position_ids=torch.full((batch, 1), position + step))
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            if watch_memory:
                peak = max(peak, rss_mb())
        seconds = time.perf_counter() - start
    return seconds, peak


def cache_batch(cache) -> int:
    layer = cache.layers[0]
    return layer.batch_size if isinstance(layer, RaggedLayer) else layer.keys.shape[0]


def held_entries(cache) -> int:
    """KV entries the cache holds (every layer, KV head and row): what it would take with no room and no padding."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, RaggedLayer):
            total += sum(map(sum, layer.lengths))
        else:
            total += layer.keys.shape[0] * layer.keys.shape[1] * layer.keys.shape[2]
    return total


def built_cache(lm, state, kept: dict[int, list[torch.Tensor]], ragged: bool, batch: int) -> DynamicCache:
    """The cache a plan leaves after the prefill of `state`'s context, for `batch` rows holding that context: a
    RaggedLayer per compressed layer (`ragged`), else dense layers of the kept positions (kvpress's layout)."""
    cache = DynamicCache(config=lm.model.config)
    for idx, full in enumerate(state.cache.layers):
        keys, values = full.keys.expand(batch, -1, -1, -1), full.values.expand(batch, -1, -1, -1)
        heads = kept.get(idx)
        if heads is not None and ragged:
            cache.layers[idx] = RaggedLayer.from_dense(keys, values, [heads] * batch)
            continue
        layer = cache.layers[idx]
        if heads is not None:  # every head keeps as many positions in a dense per-layer entry
            index = torch.stack(heads)[None, :, :, None].expand(batch, -1, -1, keys.shape[-1])
            keys, values = keys.gather(2, index), values.gather(2, index)
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys.contiguous().clone(), values.contiguous().clone()
    return cache


def child(args) -> None:
    """A fresh process: load, prefill with one plan, decode; print its cache bytes and resident memory."""
    lm = load_model(args.model, dtype=args.dtype)
    sample = long_sample(lm.tokenizer, args.child_context + 200)
    engine = PrefillEngine(lm)
    parts = engine_parts(engine, sample)
    plan = load_plan(args.child_plan).plans[0]
    before = rss_mb()
    cache = prefill(lm, plan, parts.context_ids)
    allocated = cache_bytes(cache)
    after_prefill = rss_mb()
    _, peak = decode(lm, cache, parts.question_ids, len(parts.context_ids), args.decode, watch_memory=True)
    print(json.dumps({"cache_bytes": allocated, "rss_loaded_mb": before, "rss_after_prefill_mb": after_prefill,
                      "rss_peak_decoding_mb": peak}))


def engine_parts(engine: PrefillEngine, sample):
    return build_prompt(sample, engine.lm.tokenizer, max_context_tokens=engine.max_context)


def plans_for(lm, state, budget: int, per_head_file: str | None) -> dict[str, Plan]:
    """The three plans at `budget`; without a plan file the per-head one is Ada-KV's budgets from `state`'s own
    SnapKV scores (a prefill by an engine that scores SnapKV)."""
    info = lm.info
    if per_head_file:
        per_head = load_plan(per_head_file, model=info).plan_for(budget)
    else:  # Ada-KV's per-head budgets from this sample's SnapKV scores
        per_head = adakv_plan(info, {i: r["snapkv"] for i, r in state.rankings.items()}, policy="snapkv",
                              budget=budget, n_context=state.n_context)
    return {"uniform": uniform_plan(info, policy="snapkv", budget=budget),
            "per_layer": pyramidkv_plan(info, policy="snapkv", budget=budget), "per_head": per_head}


def prefilled(lm, sample, per_head_file: str | None):
    """One full prefill of `sample` scoring what the three plans rank by; returns (engine, state)."""
    policies = ["snapkv"]
    if per_head_file:
        engine = PrefillEngine.for_plans(lm, load_plan(per_head_file, model=lm.info).plans, policies=policies)
    else:
        engine = PrefillEngine(lm, scorers=policies)
    return engine, engine.prefill(sample)


def answers_check(lm, sample, plan: Plan) -> dict:
    """The per-head plan's answer to one sample through the engine and through PlanPress in kvpress's pipeline."""
    engine = PrefillEngine.for_plans(lm, [plan])
    state = engine.prefill(sample)
    ours = engine.run(state, plan, with_kl=False).answer
    pipe = KVPressTextGenerationPipeline(model=lm.model, tokenizer=lm.tokenizer)
    inputs = {"context_ids": torch.tensor([state.parts.context_ids]),
              "questions_ids": [torch.tensor([state.parts.question_ids])]}
    with polykv_attention(lm.model):  # Pipeline.forward: kvpress's generation from the engine's token ids
        theirs = pipe.forward(inputs, max_new_tokens=state.parts.max_new_tokens, press=PlanPress(plan))[0]
    return {"sample": str(sample.id), "engine": ours, "kvpress_pipeline": theirs, "same": ours == theirs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--contexts", default="2048,8000", help="context lengths in tokens")
    parser.add_argument("--batches", default="1,4,8", help="batch sizes")
    parser.add_argument("--budget", type=int, default=128, help="average tokens per layer and KV head")
    parser.add_argument("--per-head-plan", default=None, help="a schema-2 plan file with a rung at --budget")
    parser.add_argument("--decode", type=int, default=32, help="greedy tokens decoded after the question")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rss", action="store_true", help="also the peak RSS of a fresh process per plan (batch 1)")
    parser.add_argument("--check-data", default="calibration_data/eval.jsonl")
    parser.add_argument("--check-samples", type=int, default=2)
    parser.add_argument("--out", default="outputs/benchmarks/ragged_cache.json")
    parser.add_argument("--child-plan", help=argparse.SUPPRESS)
    parser.add_argument("--child-context", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_plan:
        child(args)
        return
    lm = load_model(args.model, dtype=args.dtype)
    batches = [int(b) for b in args.batches.split(",")]
    report = {"model": args.model, "dtype": args.dtype, "budget": args.budget, "threads": torch.get_num_threads(),
              "decode_tokens": args.decode, "batches": batches, "contexts": []}
    for context in [int(c) for c in args.contexts.split(",")]:
        sample = long_sample(lm.tokenizer, context + 200)  # the context itself about `context` tokens
        engine, state = prefilled(lm, sample, args.per_head_plan)
        plans = plans_for(lm, state, args.budget, args.per_head_plan)
        kept = {kind: engine.kept_indices(state, plan) for kind, plan in plans.items()}
        row = {"context_tokens": state.n_context,
               "per_head_dense_layout_bytes": padded_bytes(plans["per_head"], lm, state.n_context), "batches": []}
        print(f"context {state.n_context} tokens, {args.budget} per layer and head, {args.decode} decoded tokens:")
        for batch in batches:
            seconds: dict[str, list[float]] = {kind: [] for kind in KINDS}
            built, after = {}, {}
            for _ in range(args.repeats):  # the plans take turns, so drift hits them alike
                for kind in KINDS:
                    cache = built_cache(lm, state, kept[kind], kind == "per_head", batch)
                    built[kind] = (cache_bytes(cache), held_entries(cache))
                    seconds[kind].append(decode(lm, cache, state.parts.question_ids, state.n_context,
                                                args.decode)[0])
                    after[kind] = (cache_bytes(cache), held_entries(cache))
            per_entry = 2 * lm.info.head_dim * next(lm.model.parameters()).element_size()
            speed = {kind: batch * args.decode / statistics.median(seconds[kind]) for kind in KINDS}
            entry = {"batch": batch,
                     "cache_bytes": {k: built[k][0] for k in KINDS},
                     "bytes_over_held": {k: round(built[k][0] / (built[k][1] * per_entry), 4) for k in KINDS},
                     "bytes_over_held_after_decoding": {k: round(after[k][0] / (after[k][1] * per_entry), 4)
                                                        for k in KINDS},
                     "cache_ratio_to_uniform": {k: round(built[k][0] / built["uniform"][0], 4) for k in KINDS},
                     "decode_tokens_per_s": {k: round(v, 2) for k, v in speed.items()},
                     "decode_speed_ratio_to_uniform": {k: round(speed[k] / speed["uniform"], 3) for k in KINDS}}
            row["batches"].append(entry)
            for kind in KINDS:
                print(f"  batch {batch} {kind:<9} cache {built[kind][0] / 1e6:7.2f} MB "
                      f"({entry['bytes_over_held'][kind]:.3f} x its entries; "
                      f"{entry['bytes_over_held_after_decoding'][kind]:.3f} x after decoding; "
                      f"{entry['cache_ratio_to_uniform'][kind]:.3f} x uniform), "
                      f"{entry['decode_tokens_per_s'][kind]:.1f} tokens/s "
                      f"({entry['decode_speed_ratio_to_uniform'][kind]:.2f} x uniform)")
        print(f"  the per-head plan in a dense layout would take {row['per_head_dense_layout_bytes'] / 1e6:.2f} MB a "
              f"row ({row['per_head_dense_layout_bytes'] / row['batches'][0]['cache_bytes']['per_head'] * batches[0]:.2f}"
              " x its ragged cache)")
        if args.rss:
            row["peak_rss_decoding_mb"] = peak_rss(args, lm, plans, context)
            print("  peak RSS decoding at batch 1: " + ", ".join(
                f"{k} {v:.0f} MB" for k, v in row["peak_rss_decoding_mb"].items()))
        report["contexts"].append(row)
    rows = [answers_check(lm, sample, plans_for(lm, prefilled(lm, sample, args.per_head_plan)[1], args.budget,
                                                args.per_head_plan)["per_head"])
            for sample in load_samples(args.check_data)[:args.check_samples]]  # Ada-KV: each sample's own
    report["answers_check"] = rows
    if rows:
        print(f"check: {sum(r['same'] for r in rows)}/{len(rows)} samples give the same answer through the engine "
              "and through PlanPress in kvpress's pipeline (ragged cache)")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written: {args.out}")


def peak_rss(args, lm, plans: dict[str, Plan], context: int) -> dict[str, float]:
    """The peak resident memory of a fresh process that prefills with each plan (PlanPress) and decodes."""
    memory = {}
    with tempfile.TemporaryDirectory() as tmp:
        for kind, plan in plans.items():
            path = PlanFile.build(lm.info, [plan]).save(Path(tmp) / f"{kind}.json")
            proc = subprocess.run([sys.executable, __file__, "--model", args.model, "--dtype", args.dtype,
                                   "--decode", str(args.decode), "--child-plan", str(path), "--child-context",
                                   str(context)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"memory child for {kind} failed:\n{proc.stderr[-2000:]}")
            memory[kind] = round(json.loads(proc.stdout.strip().splitlines()[-1])["rss_peak_decoding_mb"], 1)
    return memory


if __name__ == "__main__":
    main()
