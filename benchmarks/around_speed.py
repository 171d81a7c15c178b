"""Benchmark: calibrate --around's probes with each forward starting at the probe's changed layer (from the
background's kept hidden states) against every forward from the embeddings, side by side in one run on the same
prefill; checks that the two give the same KLs.

    python benchmarks/around_speed.py                            # SmolLM2, 1 calib sample, background streaming@128
    python benchmarks/around_speed.py --policies h2o_recent,streaming --budgets 32,256 --samples 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data", default="calibration_data/calib.jsonl")
    parser.add_argument("--samples", type=int, default=1)
    parser.add_argument("--background", default="streaming")
    parser.add_argument("--budget", type=int, default=128, help="the background's budget")
    parser.add_argument("--policies", default="h2o_recent,streaming")
    parser.add_argument("--budgets", default="32,512", help="each probed layer's budgets")
    parser.add_argument("--out", default="outputs/benchmarks/around_speed.json")
    args = parser.parse_args()

    from polykv_search.calibration.layer_kl import probe_plans
    from polykv_search.data import load_samples
    from polykv_search.engine import PrefillEngine
    from polykv_search.models import load_model
    from polykv_search.plan import uniform_plan

    lm = load_model(args.model)
    policies = sorted({args.background, *args.policies.split(",")})
    budgets = [int(b) for b in args.budgets.split(",")]
    engine = PrefillEngine(lm, scorers=policies)
    reference = uniform_plan(lm.info, policy=args.background, budget=args.budget)
    seconds = {"from_changed_layer": 0.0, "from_embeddings": 0.0}
    worst, rows = 0.0, 0
    for sample in load_samples(args.data)[: args.samples]:
        state = engine.prefill(sample)
        probes = [plan for _, plan in probe_plans(lm.info, args.policies.split(","), budgets, state.n_context,
                                                  background=reference)]
        rows += len(probes)
        t0 = time.perf_counter()
        started = engine.answer_metrics_many(state, probes, reference=reference)
        seconds["from_changed_layer"] += time.perf_counter() - t0
        kept, state.suffix_inputs = state.suffix_inputs, None  # every forward from the embeddings
        t0 = time.perf_counter()
        whole = engine.answer_metrics_many(state, probes)
        seconds["from_embeddings"] += time.perf_counter() - t0
        state.suffix_inputs = kept
        worst = max(worst, *(abs(a["kl"] - b["kl"]) for a, b in zip(started, whole)))
    result = {"model": args.model, "samples": args.samples, "probes": rows, "background": f"{args.background}@{args.budget}",
              "seconds": {k: round(v, 2) for k, v in seconds.items()},
              "speedup": round(seconds["from_embeddings"] / seconds["from_changed_layer"], 2),
              "max_abs_kl_difference": worst}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
