"""One entry point for every exact solver of the allocation problem."""

from __future__ import annotations

from typing import Literal

from polykv_search.errors import ConfigError
from polykv_search.optimization.allocation import Allocation
from polykv_search.optimization.dp import solve_dp
from polykv_search.optimization.ilp import solve_ilp
from polykv_search.optimization.problem import Problem

SOLVERS = ("dp", "ilp")


def solve(problem: Problem, *, solver: Literal["dp", "ilp"] = "dp", time_limit: float = 10.0,
          mip_gap: float = 1e-6) -> Allocation:
    """Best plan of `problem`: "dp" is exact and ignores time_limit and mip_gap; "ilp" passes both to HiGHS."""
    if solver == "dp":
        return solve_dp(problem)
    if solver == "ilp":
        return solve_ilp(problem, time_limit=time_limit, mip_gap=mip_gap)
    raise ConfigError(f"solver {solver!r} is not one of {', '.join(SOLVERS)}")
