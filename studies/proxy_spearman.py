"""Study: how well the profile's additive per-layer cost predicts the measured end-to-end loss (mean KL to the
full cache over reference answers) of random feasible plans, as Spearman's rho, on the default model.

    python studies/proxy_spearman.py                 # needs outputs/smollm2-135m/profile.safetensors (calibrate)
    python studies/proxy_spearman.py --budget 64 --plans 30 --samples 8
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--profile", default="outputs/smollm2-135m/profile.safetensors")
    parser.add_argument("--data", default="calibration_data/calib.jsonl")
    parser.add_argument("--budgets", default="64,128,256")
    parser.add_argument("--plans", type=int, default=24)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--out", default="outputs/studies/proxy_spearman.json")
    args = parser.parse_args()

    from polykv_search.calibration import Profile
    from polykv_search.data import load_samples
    from polykv_search.engine import EndToEndObjective
    from polykv_search.models import load_model
    from polykv_search.optimization.proxy import check_proxy

    profile = Profile.load(args.profile)
    lm = load_model(args.model)
    samples = load_samples(args.data)[: args.samples]
    objective = EndToEndObjective(lm, samples, policies=profile.policies)
    rows = []
    for budget in [float(b) for b in args.budgets.split(",")]:
        for cost in ("mass_lost", "out_err"):
            start = time.perf_counter()
            report = check_proxy(profile, objective.many, budget=budget, n_plans=args.plans, cost=cost)
            rows.append({"budget": budget, "cost": cost, "spearman": round(report.spearman, 3),
                         "pvalue": report.pvalue, "plans": args.plans, "samples": len(objective.states),
                         "seconds": round(time.perf_counter() - start, 1)})
            print(f"budget {budget:>6g}  cost {cost:<9}  spearman {report.spearman:+.3f} (p={report.pvalue:.2g}) "
                  f"over {args.plans} random plans x {len(objective.states)} samples")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
