"""Benchmark: how `evaluate` should batch a sample's methods, side by side on the same prefills.

    python benchmarks/eval_batching.py --plan outputs/smollm2-135m/plan.json --max-samples 3 --dtype bfloat16

For each held-out sample (one prefill) it answers the full cache and every method `evaluate` would score (the
uniform policies, PyramidKV, CAKE, Ada-KV and the plan at each of the plan's budgets) in batches of 16 rows (what
`evaluate` does), of 8, of 4, and all in one batch, and times each. Each row's cache is padded to the longest in its
batch (the padding masked out), so the batch size trades the weights' reuse against attention over padding.
Prints seconds per sample for each and how many greedy answers differ from the batches of 16: the same plan on the
same prefill, only its batch neighbours changed, so any difference is float rounding flipping a near-tie (the
noise floor of an evaluation in that dtype).
"""

from __future__ import annotations

import argparse
import statistics
import time

from polykv_search.calibration import Profile
from polykv_search.data import load_samples, spread_over_tasks
from polykv_search.engine import PrefillEngine
from polykv_search.evaluation import ALLOCATORS, build_methods
from polykv_search.models import load_model
from polykv_search.plan import load_plan

COMPARE = "streaming,snapkv,h2o_recent,tova_recent,expected_attention_recent"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--plan", required=True)
    parser.add_argument("--profile", help="for CAKE (left out without it)")
    parser.add_argument("--data", default="calibration_data/eval.jsonl")
    parser.add_argument("--max-samples", type=int, default=3)
    parser.add_argument("--policies", default=COMPARE)
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args()
    lm = load_model(args.model, dtype=args.dtype)
    plan_file = load_plan(args.plan)
    methods = build_methods(lm.info, budgets=plan_file.budgets, uniform_policies=args.policies.split(","),
                            allocators=ALLOCATORS, allocator_policy="snapkv",
                            profile=Profile.load(args.profile) if args.profile else None, plans=[("plan", plan_file)])
    engine = PrefillEngine.for_plans(lm, [m.plan for m in methods], policies=[m.policy for m in methods if m.policy])
    samples = spread_over_tasks(load_samples(args.data), args.max_samples)
    ways = {"16 a batch": [], "8 a batch": [], "4 a batch": [], "one batch": []}
    differ = dict.fromkeys(list(ways)[1:], 0)
    engine.run_many(engine.prefill(samples[0]), [None], with_kl=True)  # first-call costs
    for sample in samples:
        state = engine.prefill(sample)
        plans = [m.plan_for(state) for m in methods]
        before = None
        for name, batch in (("16 a batch", 16), ("8 a batch", 8), ("4 a batch", 4), ("one batch", len(plans) + 1)):
            start = time.perf_counter()
            got = [engine.run(state, None, with_kl=False)] + engine.run_many(state, plans, with_kl=True,
                                                                             batch_size=batch)
            ways[name].append(time.perf_counter() - start)
            if before is None:
                before = got
            else:
                differ[name] += sum(a.answer != b.answer for a, b in zip(before, got))
        print(f"{sample.id}: {state.n_context} tokens, {len(plans) + 1} rows: "
              + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in ways.items()), flush=True)
    base = statistics.mean(ways["16 a batch"])
    for name, seconds in ways.items():
        mean = statistics.mean(seconds)
        note = "" if name == "16 a batch" else f", {differ[name]} of {len(samples) * (len(methods) + 1)} answers differ"
        print(f"{name}: {mean:.1f} s per sample ({mean / base:.2f}x 16 a batch){note}")


if __name__ == "__main__":
    main()
