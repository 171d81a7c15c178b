"""`optimize --target`: plans an engine runs as they are (polykv_search.export writes them in its format).

    kvpress        any plan (the default)
    trtllm         the per-layer problem with the streaming policy only, each budget above its sinks: one
                   StreamingLLM window per layer (TensorRT-LLM's max_attention_window, sink_token_length); with a
                   per-head cost (head_fisher, head_kl) a layer's cost at a window is the sum of its KV heads'
                   StreamingLLM costs at that window
    duo-attention  per KV head, StreamingLLM at one shared window W or the whole context (DuoAttention)

duo-attention assumes the profile's top grid level T holds the whole context: a full head is counted at T tokens
and costs the profile's cost at T. For each window W of the grid (above the sinks, within floor and cap) the
budget leaves room for k = (total - S W) // (T - W) full heads among the S KV heads; which k is solved exactly by
the package's dp / ilp on a table with two options per head (streaming at W, full), and the W with the lowest
total cost wins. The tokens the total leaves over go to the full heads (above T: still the whole context), so the
heads' budgets sum to the total exactly, as in every plan.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from polykv_search.calibration.profile import HEAD_COST_KINDS, Profile
from polykv_search.errors import ConfigError, SolverError
from polykv_search.export import DUO_ATTENTION, KVPRESS, TARGETS, TRTLLM
from polykv_search.optimization.problem import Problem
from polykv_search.optimization.solve import solve
from polykv_search.plan import HeadPlan, LayerPlan, Plan, SearchInfo, budget_total
from polykv_search.policies import policy_params

if TYPE_CHECKING:
    from polykv_search.models.info import ModelInfo
    from polykv_search.optimization.run import OptimizeConfig

STREAMING = "streaming"
N_SINK = int(policy_params(STREAMING)["n_sink"])  # every plan of a target uses the registered sinks


# What TensorRT-LLM and DuoAttention run without a plan, at the memory of a plan of average budget B: one StreamingLLM
# window of B tokens with the same sinks on every layer (TensorRT-LLM), every KV head streaming at that window
# (DuoAttention): both the uniform streaming plan at B. Of the grid's other windows, a smaller one keeps a subset of
# its tokens (the sinks and fewer recent ones) and a larger one holds more memory than the plan, so per budget this
# one setting stands for the engine's own best at equal memory (the guard's and the report's engine baseline).
ENGINE_SETTINGS: dict[str, tuple[str, ...]] = {TRTLLM: (STREAMING,), DUO_ATTENTION: (STREAMING,)}


def engine_settings(target: str) -> list[str]:
    """The uniform policies standing for what `target`'s engine runs without a plan (none for kvpress: any plan)."""
    return list(ENGINE_SETTINGS.get(target, ()))


def check_target(config: Any) -> None:
    """ConfigError, in one line, for an option the target's engine cannot follow (called by OptimizeConfig)."""
    target = config.target
    if target not in TARGETS:
        raise ConfigError(f"--target {target!r} is not one of {', '.join(TARGETS)}")
    if target == KVPRESS:
        return
    if config.solver not in ("dp", "ilp"):
        raise ConfigError(f"--target {target} solves exactly for what the engine expresses: use --solver dp or ilp")
    per_head = config.cost in HEAD_COST_KINDS  # trtllm: summed over each layer's KV heads (trtllm_plan)
    if target == DUO_ATTENTION and not per_head:
        raise ConfigError(f"--target duo-attention chooses per KV head: --cost {config.cost} is per layer; use "
                          f"--cost {' or '.join(HEAD_COST_KINDS)} (calibrate --head-kl)")
    dropped = [flag for flag, used in (
        ("--policies", config.policies is not None and tuple(config.policies) != (STREAMING,)),
        ("--only", bool(config.allowed)), ("--max-policies", config.max_policies is not None),
        ("--max-changes", config.max_changes is not None),
        ("--tie", bool(config.tied) and target == DUO_ATTENTION)) if used]
    if dropped:
        kept = "per layer" if target == TRTLLM else "or full heads"
        raise ConfigError(f"--target {target} keeps StreamingLLM only ({kept}); drop {', '.join(dropped)}")


def check_target_budgets(config: OptimizeConfig, budgets: Sequence[float], grid: Sequence[int],
                         info: ModelInfo) -> None:
    """ConfigError, in one line naming the feasible averages, for a budget `config.target` cannot express on a
    profile of `grid` (run calls it before calibrating): trtllm, one window per layer between the grid's lowest level
    above the sinks and its highest; duo-attention, a whole number, a window of the grid exactly or enough for a
    full head beside the shared lowest window, and at most the top level (the whole context)."""
    if config.target == KVPRESS:
        return
    grid = sorted(int(level) for level in grid)
    fits = [w for w in grid if w > N_SINK and w >= config.floor and (config.cap is None or w <= config.cap)]
    name = f"--target {config.target}"
    if config.target == TRTLLM:
        layers = len(info.compressible_layers)
        bad = [b for b in budgets if not fits or not layers * fits[0] <= budget_total(b, layers) <= layers * fits[-1]]
        if bad:
            feasible = f"{fits[0]} to {fits[-1]} tokens per layer" if fits else "none"
            raise ConfigError(f"{name} cannot spend --budget {', '.join(f'{b:g}' for b in bad)} as one StreamingLLM "
                              f"window per layer on the grid {grid}: the feasible averages are {feasible} (windows "
                              f"above the {N_SINK} sinks, within --floor / --cap); choose budgets in that range or "
                              "calibrate another --grid")
        return
    slots, top = len(info.compressible_layers) * info.num_kv_heads, grid[-1]
    bad = [b for b in budgets if not float(b).is_integer() or b > top or
           not duo_windows(budget_total(b, slots), slots, grid, floor=config.floor, cap=config.cap)]
    if bad:
        windows = [w for w in fits if w < top]
        feasible = (f"the windows {', '.join(map(str, windows))} exactly, or any whole number from "
                    f"{math.ceil(windows[0] + (top - windows[0]) / slots)} to {top}" if windows else "none")
        raise ConfigError(f"{name} cannot spend --budget {', '.join(f'{b:g}' for b in bad)} as one StreamingLLM "
                          f"window shared by the {slots} KV heads plus full heads of {top} tokens (the top level of "
                          f"the grid {grid}, counted as the whole context): the feasible averages per KV head are "
                          f"{feasible}; choose one of those or calibrate another --grid")


def duo_windows(total: int, slots: int, grid: Sequence[int], *, floor: int,
                cap: int | None) -> list[tuple[int, int, int, int]]:
    """(grid index, window W, full heads k, tokens left over) for each window of the grid (all but its top level T)
    that a duo-attention plan of `total` tokens over `slots` KV heads can use: W above the sinks and within floor
    and cap, S W <= total, k = (total - S W) // (T - W), and a total between S W and one full head more skipped
    (W cannot spend it exactly)."""
    top, out = grid[-1], []
    for g, window in enumerate(grid[:-1]):
        spare = total - slots * window
        if window <= N_SINK or window < floor or (cap is not None and window > cap) or spare < 0:
            continue
        n_full = min(spare // (top - window), slots)
        left = spare - n_full * (top - window)
        if not left or n_full:
            out.append((g, window, n_full, left))
    return out


def restrict_to_target(config: OptimizeConfig) -> OptimizeConfig:
    """trtllm: the streaming policy only, budgets above its sinks (a window must exceed sink_token_length)."""
    if config.target != TRTLLM:
        return config
    return replace(config, policies=(STREAMING,), floor=max(config.floor, N_SINK + 1))


def layer_streaming_costs(profile: Profile, config: OptimizeConfig) -> np.ndarray:
    """Per compressible layer and grid level, the cost of one StreamingLLM window on the whole layer from a per-head
    profile: the sum over the layer's KV heads of each head's `config.cost` streaming at that window (each measured
    with that head alone compressed, so the sum is the same additive proxy the per-head plans solve): (L_c, G)."""
    if STREAMING not in profile.policies:
        raise ConfigError(f"--target {config.target} needs the profile's streaming costs; it has "
                          f"{', '.join(profile.policies)}: re-run calibrate with streaming among --policies")
    table = profile.head_costs(config.cost, config.weighting).double().numpy()  # (L, H_kv, P, G)
    layers = profile.model.compressible_layers
    return table[layers][:, :, profile.policies.index(STREAMING)].sum(axis=1)  # (L_c, G)


def trtllm_plan(profile: Profile, average: float, *, config: OptimizeConfig, cap: int, signature: str | None) -> Plan:
    """The cheapest plan of one StreamingLLM window per layer at `average` tokens per layer, on a per-head cost
    summed per layer (`layer_streaming_costs`), solved exactly; windows above the sinks (`restrict_to_target`)."""
    layers = profile.model.compressible_layers
    costs = layer_streaming_costs(profile, config)  # (L_c, G)
    problem = Problem(costs[:, None, :], profile.budgets, layers, [STREAMING], total=budget_total(average, len(layers)),
                      floor=config.floor, cap=cap)
    allocation = solve(problem, solver=config.solver, time_limit=config.time_limit, mip_gap=config.mip_gap)
    notes = (f"trtllm: one StreamingLLM window per layer ({N_SINK} sinks), cost {config.cost} ({config.weighting}) "
             f"of the layer's {profile.model.num_kv_heads} KV heads streaming at that window, summed")
    return allocation.to_plan(profile.model, average_budget=average, profile_signature=signature, notes=notes)


def duo_attention_plan(profile: Profile, average: float, *, config: OptimizeConfig, cap: int,
                       signature: str | None) -> Plan:
    """The cheapest DuoAttention plan at `average` tokens per KV head (see the module docstring)."""
    started = time.perf_counter()
    info = profile.model
    layers, heads = info.compressible_layers, info.num_kv_heads
    if STREAMING not in profile.policies:
        raise ConfigError(f"--target duo-attention needs the profile's streaming costs; it has "
                          f"{', '.join(profile.policies)}: re-run calibrate with streaming among --policies")
    table = profile.head_costs(config.cost, config.weighting).double().numpy()  # (L, H_kv, P, G)
    costs = table[layers][:, :, profile.policies.index(STREAMING)].reshape(len(layers) * heads, -1)  # (S, G)
    grid, slots = list(profile.budgets), len(layers) * heads
    top, total = grid[-1], budget_total(average, slots)
    tried: dict[int, tuple[Any, int, int]] = {}  # W -> (allocation, full heads, tokens left over)
    for g, window, n_full, left in duo_windows(total, slots, grid, floor=config.floor, cap=cap):
        two = np.stack([costs[:, g], costs[:, -1]], axis=1)[:, None, :]  # (S, 1, 2): streaming at W, full
        problem = Problem(two, (1, 2), range(slots), [STREAMING], total=slots + n_full)  # budget 2 = a full head
        tried[window] = (solve(problem, solver=config.solver, time_limit=config.time_limit, mip_gap=config.mip_gap),
                         n_full, left)
    if not tried:
        windows = [w for w in grid[:-1] if w > N_SINK and config.floor <= w <= cap]
        raise SolverError(f"no shared window fits average {average:g} per KV head: the windows {windows} of the grid "
                          f"(above {N_SINK} sinks) need the {slots} KV heads' total {total} to be at least "
                          f"{slots} x W and to leave over only what full heads of {top} tokens absorb; choose an "
                          f"average of {min(windows, default=top)} or more (or exactly a window)")
    best = min(tried, key=lambda w: (tried[w][0].objective, w))
    allocation, n_full, left = tried[best]
    full = [i for i, slot in enumerate(allocation.layers) if slot.budget == 2]
    share, rest = divmod(left, max(n_full, 1))
    budgets = [best] * slots
    for rank, i in enumerate(full):
        budgets[i] = top + share + (1 if rank < rest else 0)
    entries = [LayerPlan(index=layer, policy=None, heads=tuple(HeadPlan.of(STREAMING, budgets[i * heads + h])
                                                                 for h in range(heads)))
               for i, layer in enumerate(layers)]
    notes = (f"duo-attention: StreamingLLM window {best} ({N_SINK} sinks + {best - N_SINK} recent) on "
             f"{slots - n_full} KV heads, {n_full} full heads counted at the top grid level {top} (assumed to hold "
             f"the whole context; cost {config.cost} at {top}); export with --to duo-attention --context {top}; "
             "windows tried: " + ", ".join(f"{w}={tried[w][0].objective:.4g}" for w in sorted(tried)))
    search = SearchInfo(solver=allocation.solver, status=allocation.status, objective=float(allocation.objective),
                        bound=float(allocation.bound), gap=float(allocation.gap), profile_signature=signature,
                        seconds=round(time.perf_counter() - started, 4), notes=notes)
    return Plan.build(info, average_budget=average, layers=entries, search=search)
