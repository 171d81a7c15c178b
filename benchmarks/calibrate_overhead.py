"""Benchmark: calibrate's wall time against plain full-cache prefill of the same samples, and peak memory of
calibrate against plain prefill on one long sample. Both ratios are measured side by side in one run.

    python benchmarks/calibrate_overhead.py                       # calib split, SmolLM2, 8k-token memory probe
    python benchmarks/calibrate_overhead.py --memory-tokens 4096 --max-samples 8

Goals (issue 2): time ratio at most 1.5; peak memory ratio at most 2 (no (layers x T x T) attention kept).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from long_context import long_sample


def plain_prefill_seconds(lm, token_lists) -> float:
    total = 0.0
    with torch.inference_mode():
        for ids in token_lists:
            batch = torch.tensor([ids])
            start = time.perf_counter()
            lm.model(input_ids=batch, use_cache=True, logits_to_keep=1)  # what generate's prefill computes
            total += time.perf_counter() - start
    return total


def time_ratio(args) -> dict:
    from polykv_search import CalibrationConfig, calibrate
    from polykv_search.data import build_prompt, load_samples
    from polykv_search.models import load_model

    lm = load_model(args.model)
    samples = load_samples(args.data)[: args.max_samples]
    max_ctx = lm.info.max_context
    token_lists = []
    for sample in samples:
        parts = build_prompt(sample, lm.tokenizer, max_context_tokens=max_ctx)
        token_lists.append(parts.context_ids + parts.question_ids + parts.answer_ids)  # the tokens calibrate runs
    plain_prefill_seconds(lm, token_lists[:1])  # warm-up
    plain_before = plain_prefill_seconds(lm, token_lists)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        calibrate(lm, samples, config=CalibrationConfig(), out_dir=out)
        calib_seconds = time.perf_counter() - start
    plain_after = plain_prefill_seconds(lm, token_lists)
    plain = (plain_before + plain_after) / 2  # the mean of a pass before and after cancels drift
    return {"samples": len(samples), "tokens": sum(map(len, token_lists)), "plain_prefill_s": round(plain, 2),
            "plain_prefill_s_before_after": [round(plain_before, 2), round(plain_after, 2)],
            "calibrate_s": round(calib_seconds, 2), "time_ratio": round(calib_seconds / plain, 3)}


def memory_child(mode: str, model: str, n_tokens: int) -> None:
    """Runs in a fresh process: prints RSS after loading and the peak RSS of one plain prefill or calibrate."""
    from polykv_search import CalibrationConfig, calibrate
    from polykv_search.data import build_prompt
    from polykv_search.models import load_model

    lm = load_model(model)
    sample = long_sample(lm.tokenizer, n_tokens)
    parts = build_prompt(sample, lm.tokenizer, max_context_tokens=lm.info.max_context)
    loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if mode == "plain":
        with torch.inference_mode():
            ids = torch.tensor([parts.context_ids + parts.question_ids + parts.answer_ids])
            lm.model(input_ids=ids, use_cache=True, logits_to_keep=1)
    else:
        with tempfile.TemporaryDirectory() as out:
            calibrate(lm, [sample], config=CalibrationConfig(), out_dir=out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"mode": mode, "tokens": len(parts.context_ids) + len(parts.question_ids) + len(parts.answer_ids),
                      "rss_loaded_mb": loaded / 1024, "rss_peak_mb": peak / 1024,
                      "seconds": time.perf_counter() - start}))


def memory_ratio(args) -> dict:
    results = {}
    for mode in ("plain", "calibrate"):
        proc = subprocess.run([sys.executable, __file__, "--memory-child", mode, "--model", args.model,
                               "--memory-tokens", str(args.memory_tokens)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"memory child {mode} failed:\n{proc.stderr[-2000:]}")
        results[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    plain, calib = results["plain"], results["calibrate"]
    return {"tokens": plain["tokens"],
            "plain_peak_mb": round(plain["rss_peak_mb"]), "calibrate_peak_mb": round(calib["rss_peak_mb"]),
            "peak_ratio": round(calib["rss_peak_mb"] / plain["rss_peak_mb"], 3),
            "plain_above_loaded_mb": round(plain["rss_peak_mb"] - plain["rss_loaded_mb"]),
            "calibrate_above_loaded_mb": round(calib["rss_peak_mb"] - calib["rss_loaded_mb"]),
            "plain_s": round(plain["seconds"], 1), "calibrate_s": round(calib["seconds"], 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="calibration_data/calib.jsonl")
    parser.add_argument("--max-samples", type=int, default=None)
    parser.add_argument("--memory-tokens", type=int, default=8192)
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--memory-child", choices=["plain", "calibrate"], help=argparse.SUPPRESS)
    parser.add_argument("--out", default="outputs/benchmarks/calibrate_overhead.json")
    args = parser.parse_args()
    if args.memory_child:
        memory_child(args.memory_child, args.model, args.memory_tokens)
        return
    import logging

    logging.basicConfig(level=logging.WARNING)
    report = {"model": args.model, "threads": torch.get_num_threads()}
    if not args.skip_time:
        report["time"] = time_ratio(args)
        t = report["time"]
        print(f"time   : calibrate {t['calibrate_s']} s / plain prefill {t['plain_prefill_s']} s over "
              f"{t['samples']} samples ({t['tokens']} tokens) = {t['time_ratio']:.2f}x  (goal <= 1.5)")
    if not args.skip_memory:
        report["memory"] = memory_ratio(args)
        m = report["memory"]
        print(f"memory : peak RSS calibrate {m['calibrate_peak_mb']} MB / plain prefill {m['plain_peak_mb']} MB at "
              f"{m['tokens']} tokens = {m['peak_ratio']:.2f}x  (goal <= 2); above the loaded model: "
              f"{m['calibrate_above_loaded_mb']} MB vs {m['plain_above_loaded_mb']} MB")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
