"""What `evaluate` compares at each budget: the full cache, every uniform policy, the PyramidKV and CAKE allocations
(a budget per layer), Ada-KV (a budget per KV head, from each sample's scores), and the user's plans.

A plan made for TensorRT-LLM (`--target trtllm`) is answered as that engine computes it (`Method.windowed`: each
layer's window applies in the prefill and rolls after it, PrefillEngine.run_windowed), beside the engine's own
setting computed the same way: `trtllm_window`, one window of the budget on every layer (family "engine")."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from polykv_search.calibration.profile import Profile
from polykv_search.engine import PrefillState
from polykv_search.errors import ConfigError, ExportError
from polykv_search.export import KVPRESS, TARGETS, TRTLLM
from polykv_search.export.trtllm import trtllm_kv_cache_config
from polykv_search.models.info import ModelInfo
from polykv_search.optimization.allocators import adakv_plan, cake_plan, pyramidkv_plan
from polykv_search.optimization.targets import engine_settings
from polykv_search.plan import Plan, PlanFile, uniform_plan
from polykv_search.plan.plan import rung_for_length

FAMILIES = ("full", "uniform", "allocator", "plan", "engine")
TRTLLM_WINDOW = "trtllm_window"  # TensorRT-LLM's own setting: one window on every layer, as the engine computes it
logger = logging.getLogger(__name__)
ALLOCATORS = ("pyramidkv", "cake", "adakv")


def check_allocators(names: Sequence[str]) -> list[str]:
    """`names` as a list when every one is a known allocator (none is fine), else ConfigError naming the known."""
    unknown = sorted(set(names) - set(ALLOCATORS))
    if unknown:
        raise ConfigError(f"unknown allocator {', '.join(unknown)}; known: {', '.join(ALLOCATORS)} (or none)")
    return list(names)


@dataclass(frozen=True)
class Method:
    """A named plan in a comparison: `family` is full, uniform, allocator or plan (plan None: the full cache).
    An allocator that decides from each input (Ada-KV) has no plan but `allocate`, which makes one per sample."""

    name: str  # e.g. "full", "snapkv", "pyramidkv", "cake", "adakv", or a plan file's stem
    family: str
    plan: Plan | None
    allocate: Callable[[PrefillState], Plan] | None = None
    budget: float | None = None  # the average budget of an `allocate` method
    policy: str | None = None  # the ranking an `allocate` method needs scored
    rungs: tuple[Plan, ...] = ()  # a plan's rungs at one budget, one per range of prompt lengths (schema 2.1)
    target: str | None = None  # the engine a plan was made for (trtllm, duo-attention): its R against that engine too
    engine: tuple[str, ...] = ()  # the methods standing for the target engine's own setting
    windowed: bool = False  # answered as TensorRT-LLM computes its windows (in the prefill too), not by eviction

    @property
    def plans(self) -> list[Plan]:
        """Every plan this method may run: its plan, or its rungs."""
        return list(self.rungs) or ([self.plan] if self.plan is not None else [])

    def plan_for(self, state: PrefillState) -> Plan | None:
        """The plan this method runs on one prefilled sample."""
        return self.allocate(state) if self.allocate is not None else self.plan

    @property
    def average_budget(self) -> float | None:
        budget = self.plan.average_budget if self.plan is not None else self.budget
        if budget is None:
            return None
        return int(budget) if float(budget).is_integer() else budget

    @property
    def key(self) -> str:
        """`name@budget`, or the name alone for the full cache."""
        return self.name if self.average_budget is None else f"{self.name}@{self.average_budget}"


FULL = Method("full", "full", None)


def check_targets(targets: Mapping[str, str] | None, names: Sequence[str]) -> dict[str, str]:
    """plan name -> engine target (trtllm, duo-attention) for the plans made for an engine; kvpress (any plan) is
    left out. ConfigError for a name that is not one of the plans or a target that is not known."""
    targets = dict(targets or {})
    unknown = [name for name in targets if name not in names]
    if unknown:
        raise ConfigError(f"--target names plan {', '.join(unknown)}, which is not among the plans "
                          f"({', '.join(names) or 'none'}); give NAME=TARGET with a plan's name (its file's stem)")
    bad = [t for t in targets.values() if t not in TARGETS]
    if bad:
        raise ConfigError(f"--target {', '.join(bad)} is not one of {', '.join(TARGETS)}")
    return {name: target for name, target in targets.items() if target != KVPRESS}


def build_methods(info: ModelInfo, *, budgets: Sequence[float], uniform_policies: Sequence[str],
                  allocators: Sequence[str], allocator_policy: str, profile: Profile | None,
                  plans: Sequence[tuple[str, PlanFile]], targets: Mapping[str, str] | None = None) -> list[Method]:
    """Every method to score (the full cache aside): the baselines at every budget, the given plans at their own.
    A plan with a target (`targets`: plan name -> trtllm or duo-attention) also carries the engine's own setting,
    scored whether asked for or not: for duo-attention the uniform policies of optimization/targets.py
    ENGINE_SETTINGS (DuoAttention prefills in full, then evicts, as the engine here does), for trtllm
    `trtllm_window` at each of the plan's budgets, both it and the plan answered as TensorRT-LLM computes them."""
    targets = check_targets(targets, [name for name, _ in plans])
    engine = {name: (TRTLLM_WINDOW,) if target == TRTLLM else tuple(engine_settings(target))
              for name, target in targets.items()}
    evicting = [p for name, ps in engine.items() if targets[name] != TRTLLM for p in ps]
    uniform_policies = list(dict.fromkeys([*uniform_policies, *evicting]))
    out = []
    for budget in budgets:
        for policy in uniform_policies:
            out.append(Method(policy, "uniform", uniform_plan(info, policy=policy, budget=budget)))
        if "pyramidkv" in allocators:
            out.append(Method("pyramidkv", "allocator", pyramidkv_plan(info, policy=allocator_policy, budget=budget)))
        if "cake" in allocators and profile is not None:
            out.append(Method("cake", "allocator", cake_plan(info, profile, policy=allocator_policy, budget=budget)))
        if "adakv" in allocators:
            if float(budget).is_integer():
                out.append(adakv_method(info, policy=allocator_policy, budget=int(budget)))
            else:  # Ada-KV keeps a whole number of tokens per layer and head
                logger.info("Ada-KV is left out at the fractional budget %s", budget)
    windows: set[float] = set()
    for name, plan_file in plans:
        windowed = targets.get(name) == TRTLLM
        if windowed:  # refused before any sample is prefilled, as `export --to trtllm` would refuse it
            check_windows(name, plan_file, info)
        for budget in plan_file.budgets:
            out.append(replace(plan_method(name, plan_file.rungs_for(budget)), target=targets.get(name),
                               engine=engine.get(name, ()), windowed=windowed))
            if windowed and budget not in windows:
                windows.add(budget)
                out.append(Method(TRTLLM_WINDOW, "engine", uniform_plan(info, policy="streaming", budget=budget),
                                  windowed=True))
    return out


def check_windows(name: str, plan_file: PlanFile, info: ModelInfo) -> None:
    """ConfigError, in one line, when a rung of the plan given `--target trtllm` is not one StreamingLLM window per
    layer (what TensorRT-LLM runs, and what its evaluation computes)."""
    for rung in plan_file.plans:
        try:
            trtllm_kv_cache_config(rung, model=plan_file.model, context=1 << 30, sliding_window=info.sliding_window or 1)
        except ExportError as exc:
            raise ConfigError(f"--target trtllm: plan {name} is no TensorRT-LLM plan ({exc}); give its --target "
                              "as kvpress, or make it with `optimize --target trtllm`") from None


def plan_method(name: str, rungs: Sequence[Plan]) -> Method:
    """A plan at one budget: its lone rung, or (one rung per range of prompt lengths) the rung each sample's
    context length picks, as the runtime does."""
    if len(rungs) == 1:
        return Method(name, "plan", rungs[0])
    chosen = tuple(rungs)
    return Method(name, "plan", None, allocate=lambda state: rung_for_length(chosen, state.n_context),
                  budget=chosen[0].average_budget, rungs=chosen)


def adakv_method(info: ModelInfo, *, policy: str, budget: int) -> Method:
    """Ada-KV around `policy` at `budget` tokens per layer (per KV head on average): a per-head plan for each sample."""
    def allocate(state: PrefillState) -> Plan:
        return adakv_plan(info, {idx: ranks[policy] for idx, ranks in state.rankings.items()}, policy=policy,
                          budget=budget, n_context=state.n_context)

    return Method("adakv", "allocator", None, allocate=allocate, budget=budget, policy=policy)
