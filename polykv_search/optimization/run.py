"""`optimize`: from a profile, one plan per average budget (a ladder), solved exactly or chosen end to end.

    dp / ilp   the exact multiple-choice knapsack on the profile's additive per-layer cost
    select     exact plans under several costs and floors, uniform plans and allocators, measured end to end on
               calibration samples; the best measured wins (never worse than the best uniform plan there)
    optuna     an end-to-end search seeded with the exact plan and every `select` candidate
    --max-changes K   (cost around_kl) the profile's probed plan with at most K layers moved to measured cells
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from polykv_search.calibration.profile import (
    ALL_COST_KINDS,
    AROUND_KL,
    HEAD_COST_KINDS,
    HEAD_KL,
    WEIGHTINGS,
    Profile,
)
from polykv_search.engine import METRICS, EndToEndObjective
from polykv_search.plan.names import SOLVERS, CostKind, Metric, Solver, Weighting
from polykv_search.errors import ConfigError
from polykv_search.optimization.optuna_search import open_storage, search
from polykv_search.optimization.problem import Problem
from polykv_search.optimization.refine import refine
from polykv_search.optimization.select import candidate_plans, select_plan
from polykv_search.optimization.solve import solve
from polykv_search.optimization.targets import (
    DUO_ATTENTION,
    TRTLLM,
    check_target,
    duo_attention_plan,
    restrict_to_target,
    trtllm_plan,
)
from polykv_search.plan import HeadPlan, LayerPlan, Plan, PlanFile, SearchInfo, budget_total
from polykv_search.policies import check_policy_names

END_TO_END: tuple[Solver, ...] = ("select", "optuna")  # the solvers that measure plans on calibration samples


@dataclass(frozen=True)
class OptimizeConfig:
    """How `optimize` chooses: the solver, the profile cost it minimises, and the constraints on every plan."""

    solver: Solver = "dp"  # dp, ilp, select or optuna
    cost: CostKind = "mass_lost"  # the profile's cost kind (layer_kl / layer_nll / around_kl: their calibrate modes)
    weighting: Weighting = "mean"  # how samples combine: mean, or equal (each sample scaled to its own level)
    policies: tuple[str, ...] | None = None  # allowed policies (default: all in the profile)
    floor: int = 1  # fewest tokens a layer may keep
    cap: int | None = None  # most tokens a layer may keep (default and upper limit: the longest calibration context)
    max_policies: int | None = None  # at most this many distinct policies over all layers
    tied: tuple[tuple[int, ...], ...] | None = None  # groups of layers forced to one policy and one budget
    allowed: Mapping[str, Sequence[int]] | None = None  # policy -> the only layers where it may be used
    max_changes: int | None = None  # around_kl: refine the probed plan, moving at most this many layers
    time_limit: float = 10.0  # ilp: seconds before HiGHS stops
    mip_gap: float = 1e-6  # ilp: relative gap to stop at
    metric: Metric = "kl"  # select / optuna: the end-to-end measure (kl, nll, miss, lost, task)
    n_trials: int = 40  # optuna: trials, seeds included
    timeout: float | None = None  # optuna: seconds
    storage: str | None = None  # optuna: journal:PATH or an RDB URL (shared by processes, resumable)
    seed: int = 0  # optuna's sampler
    target: str = "kvpress"  # the engine the plans must fit as they are: kvpress (any), trtllm, duo-attention

    def validated(self) -> OptimizeConfig:
        """The same config, or ConfigError naming the bad option and its accepted values."""
        if self.solver not in SOLVERS:
            raise ConfigError(f"--solver {self.solver!r} is not one of {', '.join(SOLVERS)}")
        if self.cost not in ALL_COST_KINDS:
            raise ConfigError(f"--cost {self.cost!r} is not one of {', '.join(ALL_COST_KINDS)}")
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(f"--weighting {self.weighting!r} is not one of {', '.join(WEIGHTINGS)}")
        check_target(self)  # --target: only what that engine expresses (optimization/targets.py)
        if self.metric not in METRICS:
            raise ConfigError(f"--metric {self.metric!r} is not one of {', '.join(METRICS)}")
        if self.policies is not None:
            check_policy_names(list(self.policies))
        if self.cost in HEAD_COST_KINDS:
            if self.solver not in ("dp", "ilp"):
                raise ConfigError(f"--cost {self.cost} allocates per KV head with an exact solver: use --solver dp "
                                  "or ilp")
            if self.tied or self.max_changes is not None:
                raise ConfigError(f"--cost {self.cost} allocates per KV head: --tie and --max-changes are per-layer "
                                  "options; drop them")
        ignored = {"select": (("--floor", self.floor != 1), ("--tie", bool(self.tied)), ("--only", bool(self.allowed)),
                              ("--max-policies", self.max_policies is not None)),
                   "optuna": (("--tie", bool(self.tied)), ("--only", bool(self.allowed)),
                              ("--max-policies", self.max_policies is not None))}.get(self.solver, ())
        dropped = [flag for flag, used in ignored if used]
        if dropped:
            raise ConfigError(f"--solver {self.solver} does not take {', '.join(dropped)} (its candidates are measured "
                              "end to end); use --solver dp or ilp for constrained plans")
        if self.max_changes is not None:
            if self.cost != AROUND_KL or self.solver != "dp":
                raise ConfigError("--max-changes refines a plan from around_kl probes; use it with --cost around_kl "
                                  "and the default --solver dp")
            ignored = [flag for flag, used in (("--weighting", self.weighting != "mean"), ("--floor", self.floor != 1),
                                               ("--cap", self.cap is not None),
                                               ("--max-policies", self.max_policies is not None),
                                               ("--tie", bool(self.tied)), ("--only", bool(self.allowed))) if used]
            if ignored:
                raise ConfigError(f"--max-changes moves at most K layers of the probed plan to measured cells; "
                                  f"{', '.join(ignored)} would be ignored, drop {'them' if len(ignored) > 1 else 'it'}")
        if not self.time_limit > 0 or not 0 <= self.mip_gap < 1:
            raise ConfigError(f"--time-limit {self.time_limit:g} must be positive and --gap {self.mip_gap:g} in "
                              "[0, 1); e.g. --time-limit 10 --gap 1e-6")
        optuna_only = [flag for flag, used in (("--storage", self.storage is not None),
                                               ("--timeout", self.timeout is not None)) if used]
        if optuna_only and self.solver != "optuna":
            raise ConfigError(f"{', '.join(optuna_only)} {'are' if len(optuna_only) > 1 else 'is'} for --solver "
                              f"optuna; drop {'them' if len(optuna_only) > 1 else 'it'} or add --solver optuna")
        if self.solver == "optuna" and self.storage is not None:
            open_storage(self.storage)  # a bad URL or an unreachable database is refused before any model loads
        return self

    @property
    def end_to_end(self) -> bool:
        """Whether the solver measures plans on calibration samples (it then needs the model and the data)."""
        return self.solver in END_TO_END


def check_budgets(budgets: float | Sequence[float]) -> list[float]:
    """The budgets as a list (ints where whole), each at least 1 token per layer, or ConfigError."""
    values = [budgets] if isinstance(budgets, (int, float)) else list(budgets)
    if not values or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 1
                         for v in values):
        raise ConfigError(f"--budget {values}: budgets must be numbers of at least 1 token per layer")
    return [int(v) if float(v).is_integer() else float(v) for v in values]


def context_cap(profile: Profile, cap: int | None) -> int:
    """Never more than the longest calibration context: more budget than context buys nothing."""
    longest = int(profile.arrays["context_tokens"].max())
    return min(cap, longest) if cap else longest


ProgressFn = Callable[[str], None]


def optimize_profile(profile: Profile, budgets: Sequence[float], *, config: OptimizeConfig = OptimizeConfig(),
                     objective: EndToEndObjective | None = None, profile_signature: str | None = None,
                     progress: ProgressFn | None = None) -> PlanFile:
    """One plan per average budget, in the order given. `objective` (select / optuna): plans measured on
    calibration samples; `profile_signature` (the profile file's sha256) goes into every plan's provenance."""
    config = restrict_to_target(config.validated())
    if config.end_to_end and objective is None:
        raise ConfigError(f"--solver {config.solver} measures plans end to end: give the objective (the model "
                          "and calibration samples)")
    names = list(config.policies) if config.policies else None
    cap = context_cap(profile, config.cap)
    plans = []
    for average in check_budgets(budgets):
        started = time.perf_counter()
        if config.max_changes is not None:
            found = refine(profile, average_budget=average, max_changes=config.max_changes, policies=names)
            plans.append(found.to_plan(profile, average_budget=average, max_changes=config.max_changes,
                                       seconds=time.perf_counter() - started, profile_signature=profile_signature))
            continue
        if config.target == DUO_ATTENTION:
            plans.append(duo_attention_plan(profile, average, config=config, cap=cap, signature=profile_signature))
            continue
        if config.target == TRTLLM and config.cost in HEAD_COST_KINDS:
            plans.append(trtllm_plan(profile, average, config=config, cap=cap, signature=profile_signature))
            continue
        if config.cost in HEAD_COST_KINDS:
            plans.append(_per_head(profile, average, config=config, names=names, cap=cap,
                                   signature=profile_signature))
            continue
        problem = Problem.from_profile(profile, average_budget=average, cost=config.cost, weighting=config.weighting,
                                       policies=names, floor=config.floor, cap=cap, allowed=config.allowed,
                                       tied=config.tied, max_policies=config.max_policies)
        exact = solve(problem, solver="ilp" if config.solver == "ilp" else "dp", time_limit=config.time_limit,
                      mip_gap=config.mip_gap)
        plan = exact.to_plan(profile.model, average_budget=average, profile_signature=profile_signature)
        if config.solver == "select":
            if progress:
                progress(f"select: measuring candidate plans at {average:g} tokens/layer")
            plan = _selected(profile, objective, average=average, names=names, cap=cap, signature=profile_signature)
        elif config.solver == "optuna":
            if progress:
                progress(f"optuna: {config.n_trials} trials at {average:g} tokens/layer")
            plan = _searched(profile, plan, objective, average=average, names=names, cap=cap, config=config,
                             signature=profile_signature)
        plans.append(plan)
    return PlanFile.build(profile.model, plans, question_aware=profile.meta.question_aware)


def per_head_problem(profile: Profile, average: float, *, config: OptimizeConfig = OptimizeConfig(cost=HEAD_KL),
                     names: list[str] | None = None, cap: int | None = None) -> Problem:
    """The allocation over (compressible layer, KV head) slots: slot i * H + h is KV head h of the i-th compressible
    layer; its cost is the profile's per-head cost of that head (`config.cost`: head_kl or head_fisher); the
    budgets of all slots sum exactly to round(average x compressible layers x KV heads). `config.allowed`
    restricts a policy to layers, i.e. to every head of them."""
    info = profile.model
    layers, heads = info.compressible_layers, info.num_kv_heads
    known = profile.policies
    chosen = list(dict.fromkeys(names)) if names else list(known)
    unknown = [p for p in chosen if p not in known]
    if unknown:
        raise ConfigError(f"policy {', '.join(map(repr, unknown))} is not in the profile; known policies: "
                          f"{', '.join(known)}")
    table = profile.head_costs(config.cost, config.weighting).double().numpy()  # (L, H_kv, P_all, G)
    costs = table[layers][:, :, [known.index(p) for p in chosen]].reshape(len(layers) * heads, len(chosen), -1)
    allowed = None
    if config.allowed:
        position = {layer: i for i, layer in enumerate(layers)}
        for name, members in config.allowed.items():
            bad = sorted(set(members) - set(position))
            if bad:
                raise ConfigError(f"--only {name}={','.join(map(str, members))} names layers {bad} that are not "
                                  f"compressible; compressible layers: {layers}")
        allowed = {name: [position[layer] * heads + h for layer in members if layer in position for h in range(heads)]
                   for name, members in config.allowed.items()}
    return Problem(costs, profile.budgets, list(range(len(layers) * heads)), chosen,
                   total=budget_total(average, len(layers) * heads), floor=config.floor, cap=cap, allowed=allowed,
                   max_policies=config.max_policies)


def _per_head(profile: Profile, average: float, *, config: OptimizeConfig, names: list[str] | None, cap: int,
              signature: str | None) -> Plan:
    """The exact allocation over every KV head of every compressible layer, as a per-head plan."""
    info = profile.model
    heads = info.num_kv_heads
    allocation = solve(per_head_problem(profile, average, config=config, names=names, cap=cap),
                       solver="ilp" if config.solver == "ilp" else "dp", time_limit=config.time_limit,
                       mip_gap=config.mip_gap)
    layers = []
    for i, layer in enumerate(info.compressible_layers):
        slots = allocation.layers[i * heads:(i + 1) * heads]
        layers.append(LayerPlan(index=layer, policy=None,
                                heads=tuple(HeadPlan(policy=s.policy, params=s.params, budget=s.budget) for s in slots)))
    search = SearchInfo(solver=allocation.solver, status=allocation.status, objective=float(allocation.objective),
                        bound=float(allocation.bound), gap=float(allocation.gap), profile_signature=signature,
                        seconds=round(float(allocation.seconds), 4),
                        notes=f"per KV head: {len(layers) * heads} slots, cost {config.cost} ({config.weighting})")
    return Plan.build(info, average_budget=average, layers=layers, search=search)


def _selected(profile: Profile, objective: EndToEndObjective, *, average: float, names: list[str] | None,
              cap: int, signature: str | None) -> Plan:
    """The best measured of the candidate plans (exact plans under each cost and floor, uniform, allocators)."""
    started = time.perf_counter()
    candidates = candidate_plans(profile, average=average, policies=names, cap=cap)
    chosen = select_plan(objective.measure, candidates, metric=objective.metric)
    ranking = chosen.ranking()
    notes = (f"end-to-end mean {chosen.metric} over {len(objective.states)} calibration samples (mean over tasks); "
             f"{len(candidates)} candidates, best first: " + ", ".join(f"{k}={v:.4g}" for k, v in ranking[:8]))
    search_info = SearchInfo(solver="select", status=chosen.name, objective=chosen.value, bound=None, gap=None,
                             profile_signature=signature, seconds=round(time.perf_counter() - started, 2), notes=notes)
    return replace(chosen.plan, search=search_info)


def _searched(profile: Profile, exact_plan: Plan, objective: EndToEndObjective, *, average: float,
              names: list[str] | None, cap: int, config: OptimizeConfig, signature: str | None) -> Plan:
    """Search end to end, seeded with the exact plan and every candidate of `select`."""
    info = profile.model
    policies = names or profile.policies
    seeds = {"exact": exact_plan}
    for name, candidate in candidate_plans(profile, average=average, policies=policies, cap=cap).items():
        if all(candidate.layers != seed.layers for seed in seeds.values()):
            seeds[name] = candidate
    result = search(objective, info=info, average_budget=average, policies=policies,
                    total=budget_total(average, len(info.compressible_layers)), floor=config.floor, cap=cap,
                    seeds=seeds, n_trials=config.n_trials, timeout=config.timeout, storage=config.storage,
                    study_name=f"polykv-{(signature or 'profile')[:12]}-{average:g}-{objective.metric}",
                    seed=config.seed)
    notes = (f"end-to-end mean {objective.metric} over {len(objective.states)} calibration samples; best seed "
             f"{result.best_seed or 'none (a searched trial won)'}; seeds: "
             + ", ".join(f"{k}={v:.4g}" for k, v in sorted(result.seed_objectives.items(), key=lambda kv: kv[1])))
    search_info = SearchInfo(solver="optuna", status=f"{result.trials} trials", objective=result.objective,
                             bound=None, gap=None, profile_signature=signature, seed=config.seed, seconds=None,
                             notes=notes)
    return replace(result.plan, search=search_info)
