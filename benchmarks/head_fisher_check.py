"""Benchmark: what `calibrate --head-fisher` costs per sample against a plain prefill of the same sample, and how
well its estimate ranks the cells against `--head-kl`'s probes, in float32 and bfloat16 side by side in one run.

    python benchmarks/head_fisher_check.py --max-samples 4 \
        --probes outputs/perhead/smollm2/profile.safetensors      # a --head-kl profile of the same model and grid

Prints, per dtype and sample: seconds of a plain prefill of the context, of calibrate without a per-head mode, with
--head-fisher's bare estimate (--probe-above inf) and with --head-fisher as it runs by default (the cells estimated
above --probe-above probed exactly; how many), and the ratios to the plain prefill; then, per sample found in the
--probes profile, the Spearman rank correlation of the bare estimate with the probes' KL over the cells (layer x KV
head x policy x budget), and the same for the mean over those samples (the table the optimizer reads). Probing
every cell costs 18-26x a plain float32 prefill on SmolLM2 (benchmarks/head_probe_speed.py).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
from scipy.stats import spearmanr

from polykv_search.calibration import CalibrationConfig, Profile, calibrate_model
from polykv_search.data import build_prompt, load_samples, spread_over_tasks
from polykv_search.models import load_model
from polykv_search.policies import PER_HEAD_POLICY_SETS

# every candidate of the per-head recipe's policy sets, as `run` calibrates them
POLICIES = ",".join(dict.fromkeys(p for chosen in PER_HEAD_POLICY_SETS for p in chosen))
BUDGETS = "16,64,256,1024,2048"


def measure(model: str, dtype: str, samples, config: CalibrationConfig) -> dict:
    lm = load_model(model, dtype=dtype)
    plain_config = CalibrationConfig(policies=config.policies, budgets=config.budgets)
    rows, costs = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        calibrate_model(lm, samples[:1], config=config, out_dir=Path(tmp) / "warm")  # first-call costs
        for index, sample in enumerate(samples):
            ids = torch.tensor([build_prompt(sample, lm.tokenizer, max_context_tokens=lm.info.max_context or 8192,
                                             ).context_ids])
            with torch.inference_mode():
                start = time.perf_counter()
                lm.model(input_ids=ids, logits_to_keep=1)
                plain = time.perf_counter() - start
            base = calibrate_model(lm, [sample], config=plain_config, out_dir=Path(tmp) / f"p{index}")
            bare = calibrate_model(lm, [sample], config=replace(config, probe_above=math.inf),
                                   out_dir=Path(tmp) / f"e{index}")
            fisher = calibrate_model(lm, [sample], config=config, out_dir=Path(tmp) / f"f{index}")
            row = {"id": sample.id, "context": ids.shape[1], "plain": plain, "calibrate": base.results[0].seconds,
                   "estimate": bare.results[0].seconds, "head_fisher": fisher.results[0].seconds,
                   "probed_cells": int(fisher.profile.arrays["head_fisher_probed"].sum()),
                   "cells": int(torch.isfinite(fisher.profile.arrays["head_fisher"]).sum())}
            rows.append(row)
            costs[sample.id] = bare.profile.arrays["head_fisher"][0]
            print(f"{dtype}: {row['context']} tokens, plain prefill {plain:.1f} s, calibrate {row['calibrate']:.1f} s "
                  f"({row['calibrate'] / plain:.1f}x), bare estimate {row['estimate']:.1f} s "
                  f"({row['estimate'] / plain:.1f}x), --head-fisher {row['head_fisher']:.1f} s "
                  f"({row['head_fisher'] / plain:.1f}x, {row['probed_cells']} of {row['cells']} cells probed)",
                  flush=True)
    return {"rows": rows, "costs": costs}


def check_probes(probes: Profile, config: CalibrationConfig) -> None:
    """Exit with a clear line, before anything is timed, when the probes' cells are not among the estimate's."""
    missing = [p for p in probes.policies if p not in config.policies]
    if missing:
        raise SystemExit(f"--probes has policies the estimate lacks ({', '.join(missing)}); add them to --policies")
    if list(probes.budgets) != list(config.budgets):
        raise SystemExit(f"--probes was calibrated on the grid {probes.budgets}, the estimate on {list(config.budgets)}; "
                         "pass --budgets " + ",".join(map(str, probes.budgets)))


def rank_agreement(estimates: dict[str, torch.Tensor], probes: Profile, policies: list[str]) -> dict:
    """Spearman of the estimate with the probes' KL per sample and for the mean over the shared samples, over the
    cells of the policies both have (the estimate's `policies`; the same budget grid, check_probes)."""
    columns = torch.tensor([policies.index(p) for p in probes.policies])
    estimates = {sid: est.index_select(2, columns) for sid, est in estimates.items()}  # (L, H_kv, P, G)
    ids = [s["id"] for s in probes.header["samples"]]
    shared = [sid for sid in estimates if sid in ids]
    per_sample = {}
    for sid in shared:
        kl, est = probes.arrays["head_kl"][ids.index(sid)], estimates[sid]
        keep = torch.isfinite(kl) & (kl > 0)
        per_sample[sid] = float(spearmanr(kl[keep].numpy(), est[keep].numpy()).statistic)
    if not shared:
        return {"per_sample": {}, "mean_table": None}
    kl = torch.stack([probes.arrays["head_kl"][ids.index(sid)] for sid in shared]).mean(0)
    est = torch.stack([estimates[sid] for sid in shared]).mean(0)
    keep = torch.isfinite(kl) & (kl > 0)
    return {"per_sample": per_sample, "mean_table": float(spearmanr(kl[keep].numpy(), est[keep].numpy()).statistic)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="calibration_data/calib.jsonl")
    parser.add_argument("--max-samples", type=int, default=4)
    parser.add_argument("--policies", default=POLICIES)
    parser.add_argument("--budgets", default=BUDGETS)
    parser.add_argument("--draws", type=int, default=CalibrationConfig().draws)
    parser.add_argument("--probe-above", type=float, default=CalibrationConfig().probe_above)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="the dtypes measured, side by side (a CPU "
                        "without native bfloat16 emulates it several times slower: float32 alone there)")
    parser.add_argument("--probes", type=Path, help="a --head-kl profile of the same model and grid, its policies "
                        "among --policies")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks/head_fisher_check.json"))
    args = parser.parse_args()
    samples = spread_over_tasks(load_samples(args.data), args.max_samples)
    config = CalibrationConfig(policies=tuple(args.policies.split(",")),
                               budgets=tuple(int(b) for b in args.budgets.split(",")), head_fisher=True,
                               draws=args.draws, probe_above=args.probe_above)
    config = config.validated()  # the policies in the profile's order, the grid sorted
    probes = Profile.load(args.probes) if args.probes else None
    if probes is not None:
        check_probes(probes, config)
    results = {dtype: measure(args.model, dtype, samples, config) for dtype in args.dtypes.split(",")}
    summary = {}
    for dtype, result in results.items():
        rows = result["rows"]
        kinds = ("plain", "calibrate", "estimate", "head_fisher", "probed_cells", "cells")
        summary[dtype] = {k: statistics.mean(r[k] for r in rows) for k in kinds}
        for k in ("calibrate", "estimate", "head_fisher"):
            summary[dtype][f"{k}_over_plain"] = statistics.mean(r[k] / r["plain"] for r in rows)
        got = summary[dtype]
        print(f"{dtype}: per sample plain prefill {got['plain']:.1f} s, calibrate {got['calibrate']:.1f} s "
              f"({got['calibrate_over_plain']:.1f}x), bare estimate {got['estimate']:.1f} s "
              f"({got['estimate_over_plain']:.1f}x), --head-fisher {got['head_fisher']:.1f} s "
              f"({got['head_fisher_over_plain']:.1f}x; {got['probed_cells']:.0f} of {got['cells']:.0f} cells probed)")
    a, b = (results[d]["costs"] if d in results else {} for d in ("float32", "bfloat16"))
    dtype_rho = []
    for sid in (a if b else {}):
        keep = torch.isfinite(a[sid]) & torch.isfinite(b[sid]) & (a[sid] > 0)
        dtype_rho.append(float(spearmanr(a[sid][keep].numpy(), b[sid][keep].numpy()).statistic))
    if dtype_rho:
        print(f"bfloat16 vs float32 estimates: Spearman {', '.join(f'{r:.3f}' for r in dtype_rho)} (per sample)")
    agreement = {}
    if probes is not None:
        for dtype, result in results.items():
            agreement[dtype] = rank_agreement(result["costs"], probes, list(config.policies))
            found = agreement[dtype]
            print(f"{dtype} estimate vs the probes' KL: Spearman per sample "
                  f"{', '.join(f'{r:.3f}' for r in found['per_sample'].values()) or 'none shared'}; mean table "
                  f"{found['mean_table'] if found['mean_table'] is None else round(found['mean_table'], 3)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"samples": len(samples), "policies": list(config.policies),
                                    "budgets": list(config.budgets), "draws": config.draws,
                                    "probe_above": config.probe_above, "per_dtype": summary,
                                    "bf16_vs_f32_spearman": dtype_rho, "vs_probes": agreement,
                                    "rows": {d: r["rows"] for d, r in results.items()}}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
