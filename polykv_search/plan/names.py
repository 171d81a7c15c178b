"""The names a plan's provenance records and the commands take: solvers, profile costs, end-to-end metrics and
sample weightings, each a Literal type and its tuple of values. Torch-free, so the command line's choices come
from here without loading the library."""

from __future__ import annotations

from typing import Literal, get_args

Solver = Literal["dp", "ilp", "select", "optuna"]  # exact (dp, ilp) or end to end on calibration samples
CostKind = Literal["mass_lost", "out_err", "layer_kl", "layer_nll", "around_kl", "head_kl", "head_fisher"]
Metric = Literal["kl", "nll", "miss", "lost", "task"]  # engine/objective.py says what each measures
Weighting = Literal["mean", "equal"]  # how calibration samples combine into one cost table

SOLVERS: tuple[Solver, ...] = get_args(Solver)
COST_NAMES: tuple[CostKind, ...] = get_args(CostKind)
METRICS: tuple[Metric, ...] = get_args(Metric)
WEIGHTINGS: tuple[Weighting, ...] = get_args(Weighting)
