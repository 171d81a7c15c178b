"""Study: which of the Fisher estimate's cells are worth probing, on calibration samples only.

    python studies/fisher_probe_share.py outputs/fisher/smollm2/profile.safetensors \
        outputs/perhead/smollm2/profile.safetensors     # --head-fisher --probe-above inf; --head-kl; same samples

Takes a profile of the bare estimate and a `--head-kl` profile of the same samples, policies and grid. For each rule
(probe the cells estimated above a threshold, at most a share of each sample's cells, the largest first) it builds
the table calibrate would write (probed cells hold the probes' KL, the others the estimate), optimizes a per-head
plan on it at each budget (the exact DP), and prints how many cells a sample probes and what the plan costs by the
probes' KL summed over its heads (lower is better; the plan optimized on the probes themselves is the floor, the
bare estimate's plan the ceiling). Every number comes from the calibration samples in the two profiles.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from polykv_search.calibration import Profile
from polykv_search.calibration.head_fisher import cells_to_probe, corrected
from polykv_search.optimization.run import OptimizeConfig, per_head_problem
from polykv_search.optimization.solve import solve

RULES = [(math.inf, 1.0), (0.1, 1.0), (0.03, 1.0), (0.01, 1.0), (0.003, 1.0), (0.003, 0.1), (0.003, 0.08),
         (0.003, 0.06), (0.003, 0.05)]


def plan_cost(profile: Profile, table: torch.Tensor, truth: np.ndarray, budget: float) -> float:
    """The probes' cost of the per-head plan optimized on `table` at `budget`."""
    problem = per_head_problem(Profile(profile.header, {**profile.arrays, "head_kl": table}), budget,
                               config=OptimizeConfig(cost="head_kl"))
    allocation = solve(problem, solver="dp")
    levels = profile.budgets
    total = 0.0
    for slot, choice in enumerate(allocation.layers):
        g = max(i for i, level in enumerate(levels) if level <= choice.budget)
        total += float(truth[slot, profile.policies.index(choice.policy), g])
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("estimate", help="a profile from calibrate --head-fisher --probe-above inf")
    parser.add_argument("probes", help="a --head-kl profile of the same samples, policies and grid")
    parser.add_argument("--budgets", default="64,128,256,512")
    args = parser.parse_args()
    fisher, probes = Profile.load(args.estimate), Profile.load(args.probes)
    if [s["id"] for s in fisher.header["samples"]] != [s["id"] for s in probes.header["samples"]]:
        raise SystemExit("the two profiles must hold the same samples in the same order")
    estimate, kl = fisher.arrays["head_fisher"], probes.arrays["head_kl"]
    info = fisher.model
    truth = probes.head_costs("head_kl").double().numpy()[info.compressible_layers]
    truth = truth.reshape(-1, *truth.shape[2:])  # (slots, P, G)
    budgets = [float(b) for b in args.budgets.split(",")]
    print(f"{estimate.shape[0]} samples; the probes' cost of the plan optimized on each table (lower is better)")
    print("rule".ljust(26) + "cells/sample " + " ".join(f"{b:>8g}" for b in budgets))
    rows = [("probes everywhere", kl, float("nan"))]
    for above, share in RULES:
        chosen = torch.stack([cells_to_probe(estimate[n], above, share) for n in range(estimate.shape[0])])
        label = "bare estimate" if math.isinf(above) else f"above {above:g}, share {share:g}"
        rows.append((label, corrected(estimate, chosen, kl.nan_to_num()), float(chosen.sum()) / estimate.shape[0]))
    for label, table, cells in rows:
        costs = [plan_cost(fisher, table, truth, b) for b in budgets]
        print(label.ljust(26) + f"{cells:>12.0f} " + " ".join(f"{c:8.3f}" for c in costs))


if __name__ == "__main__":
    main()
