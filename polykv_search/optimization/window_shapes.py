"""TensorRT-LLM window shapes: fixed ladders of one StreamingLLM window per layer, the trtllm guard's candidates.

Per-layer windows from an additive per-layer cost lose to the engine's one window when graded as TensorRT-LLM runs
them: a windowed layer changes the inputs of every layer above it, so narrow layers compound (docs/engines.md, the
"Tried" sections on trtllm windows). A smooth shape has no such proxy to overfit. Each shape spends the same total as
the engine's window of B tokens on every layer, split in proportion to fixed weights over the compressible layers,
first to last:

    pyramid    falling linearly (PyramidKV's direction)
    inverted   rising linearly (deeper layers see further)
    bottom     the first quarter of the layers at 4x the rest
    top        the last quarter at 4x the rest

Every window stays above the StreamingLLM sinks (`N_SINK` + 1 tokens at least), and the windows sum exactly to the
engine window's total, so a shape holds the engine's memory. The guard grades each on the calibration samples as
the engine computes it, beside the optimized plan, against the engine's window (optimization/guard.py).
"""

from __future__ import annotations

from collections.abc import Sequence

from polykv_search.errors import ConfigError
from polykv_search.models.info import ModelInfo
from polykv_search.optimization.targets import N_SINK, STREAMING
from polykv_search.plan import PlanFile, SearchInfo, budget_total, exact_integer_budgets
from polykv_search.plan.uniform import plan_of_budgets

WINDOW_SHAPES: tuple[str, ...] = ("pyramid", "inverted", "bottom", "top")


def shape_weights(shape: str, layers: int) -> list[float]:
    """Relative windows of `layers` compressible layers, first to last, for `shape` (one of WINDOW_SHAPES)."""
    if shape not in WINDOW_SHAPES:
        raise ConfigError(f"window shape {shape!r} is not one of {', '.join(WINDOW_SHAPES)}")
    quarter = max(1, layers // 4)
    if shape == "pyramid":
        return [float(layers - i) for i in range(layers)]
    if shape == "inverted":
        return [float(i + 1) for i in range(layers)]
    if shape == "bottom":
        return [4.0 if i < quarter else 1.0 for i in range(layers)]
    return [4.0 if i >= layers - quarter else 1.0 for i in range(layers)]


def shape_windows(shape: str, layers: int, budget: float) -> list[int]:
    """The windows of `shape` at an average of `budget` tokens per layer: above the sinks, summing exactly to
    `budget_total(budget, layers)` (ConfigError where the budget cannot keep every layer above the sinks)."""
    return exact_integer_budgets(shape_weights(shape, layers), budget_total(float(budget), layers), floor=N_SINK + 1)


def shape_ladder(info: ModelInfo, shape: str, budgets: Sequence[float], *, question_aware: bool = False) -> PlanFile:
    """One plan per budget of `budgets`: StreamingLLM on every compressible layer at the windows of `shape`."""
    layers = len(info.compressible_layers)
    plans = [plan_of_budgets(info, policy=STREAMING, params=None, budget=float(budget),
                             budgets=shape_windows(shape, layers, budget),
                             search=SearchInfo(solver="shape", status="heuristic",
                                               notes=f"trtllm: one StreamingLLM window per layer ({N_SINK} sinks), "
                                                     f"shaped {shape} (optimization/window_shapes.py)"))
             for budget in budgets]
    return PlanFile.build(info, plans, question_aware=question_aware)


def shape_ladders(info: ModelInfo, budgets: Sequence[float], shapes: Sequence[str] = WINDOW_SHAPES, *,
                  question_aware: bool = False) -> list[tuple[str, PlanFile]]:
    """(name, ladder) per shape, named "<shape> windows" (the guard's candidate names)."""
    return [(f"{shape} windows", shape_ladder(info, shape, budgets, question_aware=question_aware))
            for shape in shapes]
