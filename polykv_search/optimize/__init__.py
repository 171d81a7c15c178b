"""Exact allocation of a KV policy and a token budget to every compressible layer, from a profile's cost curves."""

from polykv_search.optimize.allocation import (
    OPTIMAL,
    TIME_LIMIT,
    Allocation,
    LayerChoice,
)
from polykv_search.optimize.problem import Options, Prepared, Problem
from polykv_search.optimize.solve import SOLVERS, solve

__all__ = ["OPTIMAL", "SOLVERS", "TIME_LIMIT", "Allocation", "LayerChoice", "Options", "Prepared", "Problem", "solve"]
