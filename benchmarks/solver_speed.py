"""Benchmark: solve time of the exact dp and the HiGHS ilp on random but realistic allocation problems (layers x
policies x budget levels), every row measured in this one run.

    python benchmarks/solver_speed.py                          # 32x8x64 and 80x10x128, dp and ilp, 10 s limit
    python benchmarks/solver_speed.py --sizes 80x10x128 --solvers dp --repeat 5

Curves: smooth decreasing losses per layer with policies that differ by a few percent (near ties), a little
noise that breaks monotonicity, grid 16, 32, ... (16 x levels). Two totals per size: average = 1/4 of the top
level (a multiple of the grid step) and the same plus 0.37 (a total no sum of grid levels reaches).
Goal (optimize issue): dp under 0.2 s at 80 layers x 10 policies x 128 levels.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from polykv_search.optimization import Problem, solve


def realistic_costs(layers: int, policies: int, levels: int, *, seed: int) -> tuple[np.ndarray, list[int]]:
    """(layers, policies, levels) losses that fall with budget, layer scales that vary 10x, near-tied policies."""
    rng = np.random.default_rng(seed)
    grid = 16 * np.arange(1, levels + 1)  # (G,)
    scale = np.exp(rng.normal(0.0, 0.8, size=(layers, 1, 1)))  # (L, 1, 1) some layers matter more
    tau = np.exp(rng.normal(np.log(grid[-1] / 6), 0.5, size=(layers, 1, 1)))  # (L, 1, 1) tokens to lose 1/e
    tau = tau * (1 + 0.03 * rng.standard_normal((layers, policies, 1)))  # (L, P, 1) policies nearly tied
    shape = 0.7 + 0.3 * rng.random((layers, policies, 1))  # (L, P, 1) convex-ish to concave-ish
    costs = scale * np.exp(-(grid / tau) ** shape)  # (L, P, G)
    costs *= 1 + 0.002 * rng.standard_normal(costs.shape)  # calibration noise: not exactly monotone
    return costs, grid.tolist()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="32x8x64,80x10x128", help="comma-separated LAYERSxPOLICIESxLEVELS")
    parser.add_argument("--solvers", default="dp,ilp")
    parser.add_argument("--time-limit", type=float, default=10.0, help="ilp time limit in seconds")
    parser.add_argument("--mip-gap", type=float, default=1e-6)
    parser.add_argument("--repeat", type=int, default=1, help="dp runs per row (the table shows the fastest)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if "ilp" in args.solvers:  # import cvxpy and HiGHS before timing: the first import alone takes ~1 s
        from polykv_search.optimization.ilp import silence_highs_banner

        silence_highs_banner()

    header = f"{'size':>10} {'average':>8} {'solver':>6} {'status':>10} {'objective':>12} {'bound':>12} " \
             f"{'gap':>9} {'seconds':>8}  agrees"
    print(header)
    print("-" * len(header))
    for size in args.sizes.split(","):
        layers, policies, levels = (int(v) for v in size.lower().split("x"))
        costs, grid = realistic_costs(layers, policies, levels, seed=args.seed)
        names = [f"policy{p}" for p in range(policies)]
        for average in (grid[-1] / 4, grid[-1] / 4 + 0.37):
            total = int(np.floor(average * layers + 0.5))
            found = {}
            for solver in args.solvers.split(","):
                runs = args.repeat if solver == "dp" else 1
                best = None
                for _ in range(runs):
                    problem = Problem(costs, grid, range(layers), names, total)  # fresh: preprocessing is timed
                    start = time.perf_counter()
                    alloc = solve(problem, solver=solver, time_limit=args.time_limit, mip_gap=args.mip_gap)
                    wall = time.perf_counter() - start
                    best = (wall, alloc) if best is None or wall < best[0] else best
                wall, alloc = best
                found[solver] = alloc.objective
                ref = found.get("dp", alloc.objective)
                agrees = "yes" if abs(alloc.objective - ref) <= 1e-6 * max(abs(ref), 1e-12) else "NO"
                print(f"{size:>10} {average:>8.2f} {solver:>6} {alloc.status:>10} {alloc.objective:>12.6f} "
                      f"{alloc.bound:>12.6f} {alloc.gap:>9.2e} {wall:>8.3f}  {agrees}", flush=True)
    print("seconds: wall time of solve() on a fresh Problem (preprocessing included); agrees: objective within "
          "1e-6 relative of dp's")
    return 0


if __name__ == "__main__":
    sys.exit(main())
