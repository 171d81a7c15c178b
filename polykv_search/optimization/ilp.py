"""The allocation problem as a mixed-integer program in cvxpy, solved by HiGHS with a time limit and a relative
gap; the status, bound and gap come from HiGHS's own result, never assumed.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings

import numpy as np
import scipy.sparse as sp

from polykv_search.errors import ConfigError, SolverError
from polykv_search.optimization.allocation import (
    OPTIMAL,
    TIME_LIMIT,
    Allocation,
    assemble,
    distribute,
)
from polykv_search.optimization.problem import Prepared, Problem

logger = logging.getLogger(__name__)

FEASIBLE = 2  # HiGHS primal_solution_status when it holds a feasible solution
_banner_silenced = False


def solve_ilp(problem: Problem, *, time_limit: float = 10.0, mip_gap: float = 1e-6) -> Allocation:
    """Solve `problem` with HiGHS through cvxpy.

    Each (super-)layer picks one (policy, grid level) option, a row of the boolean matrix x (groups x options,
    padded), plus y, how far it goes along that option's segment towards the next level, at the segment's
    slope (y <= x). With one tie size the budget row is "sum <= total" (then padded: costs never rise with
    budget) and y is a continuous fraction of the segment; for fixed x the best y is a greedy fill, recomputed
    exactly in whole tokens afterwards. With tie groups of different sizes the row is "== total" and y is an
    integer number of tokens.
    """
    try:
        import cvxpy as cp  # imported here: cvxpy and HiGHS take a second to load, and only --solver ilp needs them
        import highspy  # noqa: F401
    except ImportError as exc:
        raise SolverError(f"the ilp solver needs cvxpy and HiGHS ({exc}); run `pip install cvxpy highspy`") from exc
    if not time_limit > 0 or not 0 <= mip_gap < 1:
        raise ConfigError(f"--time-limit {time_limit:g} must be positive and --gap {mip_gap:g} in [0, 1); e.g. "
                          "--time-limit 10 --gap 1e-6")
    silence_highs_banner()
    start = time.perf_counter()
    prep = problem.prepared
    sizes = sorted({int(m) for m in prep.mult})
    limited = problem.max_policies is not None and problem.max_policies < len(problem.policies)
    opts = _options(prep, prune_levels=len(sizes) == 1 and not limited, prune_policies=not limited)
    n_groups, width = opts["valid"].shape
    extra = problem.total - int(prep.mult.sum()) * prep.lo  # tokens above the lowest level

    x = cp.Variable((n_groups, width), integer=True, bounds=[np.zeros((n_groups, width)), opts["valid"] * 1.0])
    if len(sizes) == 1:  # y: fraction of the segment, continuous; the budget row in units of the groups' size
        y = cp.Variable((n_groups, width), bounds=[np.zeros((n_groups, width)), opts["valid"] * 1.0])
        constraints = [cp.sum(x, axis=1) == 1, y <= x,
                       cp.sum(cp.multiply(opts["base"], x) + cp.multiply(opts["gap"], y)) <= extra // sizes[0]]
        rise = opts["drop"]  # cost change over a whole segment
    else:  # y: extra tokens, integer; the budget row in tokens, exact
        y = cp.Variable((n_groups, width), integer=True, bounds=[np.zeros((n_groups, width)), opts["gap"]])
        weight = prep.mult[:, None] * 1.0  # (J, 1) members per group
        constraints = [cp.sum(x, axis=1) == 1, y <= cp.multiply(opts["gap"], x),
                       cp.sum(cp.multiply(weight * opts["base"], x) + cp.multiply(weight, y)) == extra]
        rise = opts["drop"] / np.maximum(opts["gap"], 1)  # cost change per token
    if limited:
        u = cp.Variable(len(problem.policies), boolean=True)  # policy p is used somewhere
        rows = np.flatnonzero(opts["valid"].ravel())
        pick = sp.csr_matrix((np.ones(len(rows)), (rows, opts["policy"].ravel()[rows])),
                             shape=(n_groups * width, len(problem.policies)))
        constraints += [cp.vec(x, order="C") <= pick @ u, cp.sum(u) <= problem.max_policies]
    shift = float(opts["shift"])  # sum of each group's cheapest option cost, taken out of the objective
    objective = cp.Minimize(cp.sum(cp.multiply(opts["cost"], x)) + cp.sum(cp.multiply(rise, y)))
    model = cp.Problem(objective, constraints)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # cvxpy warns on a limit; the status below says it precisely
            model.solve(solver=cp.HIGHS, time_limit=float(time_limit), mip_rel_gap=float(mip_gap),
                        mip_abs_gap=0.0, verbose=False)
    except cp.error.SolverError as exc:
        raise SolverError(f"HiGHS failed on the allocation problem ({exc}); try --solver dp") from exc
    stats = model.solver_stats.extra_stats
    has_plan = stats is not None and stats.primal_solution_status == FEASIBLE
    if model.status == cp.OPTIMAL and has_plan:
        status = OPTIMAL
    elif model.status == cp.USER_LIMIT and has_plan:
        status = TIME_LIMIT
    elif model.status == cp.USER_LIMIT:
        raise SolverError(f"HiGHS found no feasible plan within the time limit of {time_limit:g} s; raise "
                          f"the time limit or use --solver dp")
    elif model.status in (cp.INFEASIBLE, cp.INFEASIBLE_INACCURATE, cp.settings.INFEASIBLE_OR_UNBOUNDED):
        raise SolverError(problem.infeasible_message())
    else:
        raise SolverError(f"HiGHS ended with status {model.status!r} on the allocation problem; try --solver dp")

    chosen = np.asarray(x.value).argmax(axis=1)  # (J,)
    rows = np.arange(n_groups)
    policy = opts["policy"][rows, chosen]
    budget = prep.lo + opts["base"][rows, chosen].astype(np.int64)
    extras = np.rint(np.asarray(y.value)[rows, chosen]).astype(np.int64)  # tokens (used with several tie sizes)
    classes: dict[int, list[int]] = {}
    for j, m in enumerate(prep.mult):
        classes.setdefault(int(m), []).append(j)
    for m, members in classes.items():  # re-place each tie size's extra tokens exactly (never worse than HiGHS)
        units = extra // m if len(classes) == 1 else int(sum(budget[j] - prep.lo + extras[j] for j in members))
        distribute(prep, members, policy, budget, units - int(sum(budget[j] - prep.lo for j in members)))
    offset = model.value - stats.objective_function_value  # cvxpy's constant, if any
    bound = float(stats.mip_dual_bound + offset + shift)
    seconds = time.perf_counter() - start
    info = {"cvxpy_status": model.status, "highs_objective": float(model.value + shift), "highs_bound": float(bound),
            "highs_mip_gap": float(stats.mip_gap), "nodes": int(stats.mip_node_count),
            "highs_seconds": float(model.solver_stats.solve_time), "time_limit": float(time_limit),
            "mip_gap": float(mip_gap), "binaries": int(opts["valid"].sum())}
    alloc = assemble(problem, policy, budget, solver="ilp", status=status, bound=bound, seconds=seconds, info=info)
    logger.info("ilp: %s objective %.6g bound %.6g gap %.2g in %.3f s", status, alloc.objective, alloc.bound,
                alloc.gap, seconds)
    return alloc


def _options(prep: Prepared, *, prune_levels: bool, prune_policies: bool) -> dict[str, np.ndarray]:
    """Per group, the (policy, level) options worth a column, padded to one width: (J, width) arrays.

    prune_policies: drop (p, k) when another policy is no worse at both ends of the segment k..k+1 (needs every
    policy to stay available, so not with max_policies). prune_levels ("sum <= total" only): drop (p, k) when
    it is not on the frontier and even its segment's end is no cheaper than an option at a level <= k.
    """
    curves = prep.group_curves  # (J, P, K)
    n_groups, n_pol, n_lev = curves.shape
    nxt = np.concatenate([curves[:, :, 1:], curves[:, :, -1:]], axis=2)  # (J, P, K) value at the next level
    keep = np.isfinite(curves)
    if prune_policies:
        no_worse = (curves[:, :, None] <= curves[:, None, :]) & (nxt[:, :, None] <= nxt[:, None, :])  # [q, p]
        same = (curves[:, :, None] == curves[:, None, :]) & (nxt[:, :, None] == nxt[:, None, :])
        earlier = np.arange(n_pol)[:, None, None] < np.arange(n_pol)[None, :, None]  # q < p
        beaten = no_worse & (~same | earlier) & ~np.eye(n_pol, dtype=bool)[None, :, :, None]
        keep &= ~beaten.any(axis=1)
    if prune_levels:
        best = curves.min(axis=1)  # (J, K)
        upto = np.minimum.accumulate(best, axis=1)  # (J, K) cheapest option at a level <= k
        before = np.concatenate([np.full((n_groups, 1), np.inf), upto[:, :-1]], axis=1)
        on_frontier = (curves == best[:, None, :]) & (best < before)[:, None, :]
        segment_helps = (nxt < upto[:, None, :]) & (np.arange(n_lev) < n_lev - 1)
        keep &= on_frontier | segment_helps
    width = int(keep.sum(axis=(1, 2)).max())
    out = {name: np.zeros((n_groups, width)) for name in ("base", "gap", "cost", "drop")}
    out["policy"] = np.zeros((n_groups, width), dtype=np.int64)
    out["valid"] = np.zeros((n_groups, width), dtype=bool)
    gaps = np.append(np.diff(prep.levels), 0)  # (K,)
    shift = 0.0
    for j in range(n_groups):
        p, k = np.nonzero(keep[j])
        n = len(p)
        low = curves[j, p, k].min()
        shift += low
        out["policy"][j, :n], out["valid"][j, :n] = p, True
        out["base"][j, :n], out["gap"][j, :n] = prep.levels[k] - prep.lo, gaps[k]
        out["cost"][j, :n] = curves[j, p, k] - low
        out["drop"][j, :n] = nxt[j, p, k] - curves[j, p, k]  # <= 0; 0 at the top level
    out["shift"] = np.asarray(shift)
    return out


def silence_highs_banner() -> None:
    """HiGHS writes a banner to the process's stdout when its first instance is made: make that one here, with
    file descriptor 1 pointed at /dev/null for the moment, so the library prints nothing."""
    global _banner_silenced
    if _banner_silenced:
        return
    import highspy  # imported here: only the ilp solver loads HiGHS (a second)

    sys.stdout.flush()
    saved, devnull = os.dup(1), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)
    _banner_silenced = True
