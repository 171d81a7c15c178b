"""Benchmark: `calibrate --head-kl`'s probes per sample against a plain prefill of the same sample, in float32 and
bfloat16 side by side in one run, and how far the bfloat16 costs agree with the float32 ones.

    python benchmarks/head_probe_speed.py --max-samples 2
    python benchmarks/head_probe_speed.py --policies streaming --budgets 64,256   # a quick look

Prints, per dtype: seconds per sample of a plain prefill, of the engine's prefill (with the policies' scorers) and
of the head probes, and the probes' ratio to the plain prefill; then the Spearman rank correlation of the two
dtypes' cells (layer x KV head x policy x budget, per sample) and the median relative difference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from scipy.stats import spearmanr

from polykv_search.calibration.layer_kl import head_probes
from polykv_search.data import load_samples, spread_over_tasks
from polykv_search.engine import PrefillEngine
from polykv_search.models import load_model

POLICIES = "expected_attention_recent,h2o_recent,streaming"  # the --head-kl profile's three (docs/results-per-head.md)
BUDGETS = "16,64,256,1024,2048"


def measure(model: str, dtype: str, samples, policies: list[str], budgets: list[int]) -> dict:
    lm = load_model(model, dtype=dtype)
    engine = PrefillEngine(lm, scorers=policies)
    rows, costs = [], []
    for sample in samples:
        state = engine.prefill(sample)  # warms up too; timed below on its own
        ids = torch.tensor([state.parts.context_ids], device=lm.device)
        with torch.inference_mode():
            start = time.perf_counter()
            lm.model(input_ids=ids)
            plain = time.perf_counter() - start
        start = time.perf_counter()
        state = engine.prefill(sample)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        cells = head_probes(engine, state, info=lm.info, policies=policies, budgets=budgets)
        probes = time.perf_counter() - start
        rows.append({"context": state.n_context, "plain": plain, "prefill": prefill, "probes": probes})
        costs.append(cells)
        print(f"{dtype}: {state.n_context} tokens, plain prefill {plain:.1f} s, engine prefill {prefill:.1f} s, "
              f"probes {probes:.1f} s ({probes / plain:.0f}x the plain prefill)", flush=True)
    return {"rows": rows, "costs": costs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="calibration_data/calib.jsonl")
    parser.add_argument("--max-samples", type=int, default=2)
    parser.add_argument("--policies", default=POLICIES)
    parser.add_argument("--budgets", default=BUDGETS)
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks/head_probe_speed.json"))
    args = parser.parse_args()
    samples = spread_over_tasks(load_samples(args.data), args.max_samples)
    policies, budgets = args.policies.split(","), [int(b) for b in args.budgets.split(",")]
    results = {dtype: measure(args.model, dtype, samples, policies, budgets) for dtype in ("float32", "bfloat16")}
    summary = {}
    for dtype, result in results.items():
        rows = result["rows"]
        summary[dtype] = {k: statistics.mean(r[k] for r in rows) for k in ("plain", "prefill", "probes")}
        summary[dtype]["probes_over_plain"] = statistics.mean(r["probes"] / r["plain"] for r in rows)
    rhos, rel = [], []
    for a, b in zip(results["float32"]["costs"], results["bfloat16"]["costs"]):
        keep = torch.isfinite(a) & torch.isfinite(b) & (a > 0)
        rhos.append(float(spearmanr(a[keep].numpy(), b[keep].numpy()).statistic))
        rel.append(float(((b[keep] - a[keep]).abs() / a[keep]).median()))
    speedup = summary["float32"]["probes"] / summary["bfloat16"]["probes"]
    print(f"probes per sample: float32 {summary['float32']['probes']:.1f} s, bfloat16 "
          f"{summary['bfloat16']['probes']:.1f} s ({speedup:.2f}x); per plain prefill: "
          f"{summary['float32']['probes_over_plain']:.0f}x and {summary['bfloat16']['probes_over_plain']:.0f}x")
    print(f"bfloat16 vs float32 cells: Spearman {', '.join(f'{r:.3f}' for r in rhos)} (per sample); median "
          f"relative difference {', '.join(f'{r:.3f}' for r in rel)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"samples": len(samples), "policies": policies, "budgets": budgets,
                                    "per_dtype": summary, "speedup": speedup, "spearman": rhos,
                                    "median_relative_difference": rel,
                                    "rows": {d: r["rows"] for d, r in results.items()}}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
