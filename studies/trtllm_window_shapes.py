"""Study (#35): TensorRT-LLM windows of a few fixed shapes across the layers, one plan file per shape.

The shapes (optimization/window_shapes.py: pyramid, inverted, bottom, top) are `run --target trtllm`'s guard
candidates beside the optimized plan; this script writes each as a ladder of its own (its name: the file's stem), for
`evaluate --target NAME=trtllm` to grade on any samples, as the engine computes it:

    python studies/trtllm_window_shapes.py --model smollm2-135m --budget 64 --out outputs/t35/shapes
    polykv-search evaluate --model smollm2-135m --dtype float32 --budgets 64 --allocators none \\
        --plan outputs/t35/shapes/pyramid.json --target pyramid=trtllm ... --data calibration_data/calib.jsonl
"""

from __future__ import annotations

import argparse
from pathlib import Path

from polykv_search.models import load_model
from polykv_search.optimization.window_shapes import WINDOW_SHAPES, shape_ladder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--budget", default="64,128,256,512")
    parser.add_argument("--shapes", default=",".join(WINDOW_SHAPES))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    info = load_model(args.model, dtype="float32").info
    budgets = [float(b) for b in args.budget.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    for shape in args.shapes.split(","):
        ladder = shape_ladder(info, shape, budgets)
        for rung in ladder.plans:
            print(f"{shape} at {rung.average_budget:g}: {[layer.budget for layer in rung.layers]}", flush=True)
        ladder.save(args.out / f"{shape}.json")


if __name__ == "__main__":
    main()
