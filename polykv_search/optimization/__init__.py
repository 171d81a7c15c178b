"""Allocation of a KV policy and a token budget to every compressible layer: the exact problem and its solvers,
the end-to-end choices built on the engine (select, choose, Optuna), the known allocators, and `optimize`."""

from polykv_search.optimization.allocation import OPTIMAL, TIME_LIMIT, Allocation
from polykv_search.optimization.allocators import adakv_plan, cake_plan, cake_preferences, pyramidkv_plan
from polykv_search.optimization.problem import Options, Prepared, Problem
from polykv_search.optimization.solve import SOLVERS, solve

__all__ = ["OPTIMAL", "SOLVERS", "TIME_LIMIT", "Allocation", "Options", "Prepared", "Problem", "adakv_plan", "cake_plan",
           "cake_preferences", "pyramidkv_plan", "solve"]
