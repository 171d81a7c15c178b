"""Study (#35): TensorRT-LLM windows of a few fixed shapes across the layers, graded as the engine computes them.

Per-layer windows chosen by the DP on additive per-layer costs lose to the engine's one window, wherever the costs
are measured (docs/engines.md, the two "Tried" sections on trtllm windows): narrow layers compound. This script writes
a handful of smooth shapes of the same total instead, one plan file per shape (its name: the file's stem), each a
ladder over the budgets, for `evaluate --target NAME=trtllm` to grade on calibration samples, then held out:

- pyramid: windows falling linearly from the first compressible layer to the last (PyramidKV's shape);
- inverted: rising linearly;
- bottom: the first quarter of the layers at 4x the rest;
- top: the last quarter at 4x the rest.

    python studies/trtllm_window_shapes.py --model smollm2-135m --budget 64 --out outputs/t35/shapes
    polykv-search evaluate --model smollm2-135m --dtype float32 --budgets 64 --allocators none \\
        --plan outputs/t35/shapes/pyramid.json --target pyramid=trtllm ... --data calibration_data/calib.jsonl
"""

from __future__ import annotations

import argparse
from pathlib import Path

from polykv_search.models import load_model
from polykv_search.plan import PlanFile, SearchInfo, budget_total, exact_integer_budgets
from polykv_search.plan.uniform import plan_of_budgets
from polykv_search.policies import policy_params

STREAMING = "streaming"
N_SINK = int(policy_params(STREAMING)["n_sink"])


def shape_weights(name: str, n: int) -> list[float]:
    """Relative windows of `n` compressible layers, first to last, for the shape `name`."""
    quarter = max(1, n // 4)
    return {"pyramid": [float(n - i) for i in range(n)],
            "inverted": [float(i + 1) for i in range(n)],
            "bottom": [4.0 if i < quarter else 1.0 for i in range(n)],
            "top": [4.0 if i >= n - quarter else 1.0 for i in range(n)]}[name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--budget", default="64,128,256,512")
    parser.add_argument("--shapes", default="pyramid,inverted,bottom,top")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    info = load_model(args.model, dtype="float32").info
    n = len(info.compressible_layers)
    args.out.mkdir(parents=True, exist_ok=True)
    for shape in args.shapes.split(","):
        plans = []
        for budget in (int(b) for b in args.budget.split(",")):
            windows = exact_integer_budgets(shape_weights(shape, n), budget_total(float(budget), n), floor=N_SINK + 1)
            plans.append(plan_of_budgets(info, policy=STREAMING, params=None, budget=float(budget), budgets=windows,
                                         search=SearchInfo(solver="shape", status="heuristic",
                                                           notes=f"trtllm windows shaped {shape} "
                                                                 "(studies/trtllm_window_shapes.py)")))
            print(f"{shape} at {budget}: {windows}", flush=True)
        PlanFile.build(info, plans).save(args.out / f"{shape}.json")


if __name__ == "__main__":
    main()
