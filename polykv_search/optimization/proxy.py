"""Proxy check: does the profile's additive per-layer loss rank plans as the measured end-to-end loss does?
Random feasible plans are predicted from the profile and measured with the engine; Spearman's rho says."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.stats import spearmanr

from polykv_search.calibration.profile import Profile
from polykv_search.data import Sample
from polykv_search.engine import EndToEndObjective
from polykv_search.models import LoadedModel
from polykv_search.plan import LayerPlan, Plan, SearchInfo, budget_total, exact_integer_budgets
RANDOM = SearchInfo(solver="random", status="heuristic")
WEAK_PROXY = 0.5  # below this rho the additive proxy is a poor guide: steer to --solver optuna


@dataclass
class ProxyReport:
    budget: float
    cost: str
    spearman: float
    pvalue: float
    predicted: list[float] = field(default_factory=list)
    measured: list[float] = field(default_factory=list)

    @property
    def weak(self) -> bool:
        return not np.isfinite(self.spearman) or self.spearman < WEAK_PROXY


def predicted_loss(profile: Profile, plan: Plan, *, cost: str = "mass_lost") -> float:
    """Sum over compressed layers of the profile's cost, monotone in budget, linear between grid levels (the
    plan's average budget picks the operating point of an around_kl cost)."""
    curves = np.minimum.accumulate(profile.layer_costs(cost, budget=plan.average_budget).numpy(), axis=-1)  # (L, P, G)
    grid = np.asarray(profile.budgets, dtype=float)
    names = profile.policies
    total = 0.0
    for layer in plan.layers:
        if layer.policy is None or layer.budget is None:
            continue
        total += float(np.interp(layer.budget, grid, curves[layer.index, names.index(layer.policy)]))
    return total


def random_plans(profile: Profile, *, budget: float, n: int, policies: Sequence[str] | None = None,
                 seed: int = 0, cap: int | None = None) -> list[Plan]:
    """n plans with a random policy per layer and a random (Dirichlet) budget split summing exactly."""
    rng = np.random.default_rng(seed)
    info = profile.model
    layers = info.compressible_layers
    names = list(policies or profile.policies)
    total = budget_total(budget, len(layers))
    plans = []
    for _ in range(n):
        weights = rng.dirichlet(np.full(len(layers), 1.0)).tolist()
        split = exact_integer_budgets(weights, total, floor=1, cap=cap)
        chosen = rng.choice(len(names), size=len(layers)).tolist()
        plans.append(Plan.build(info, average_budget=budget, search=RANDOM,
                                layers=[LayerPlan.of(layer, names[p], int(b))
                                        for layer, p, b in zip(layers, chosen, split)]))
    return plans


def check_proxy(profile: Profile, measure: Callable[[list[Plan]], list[float]], *, budget: float,
                n_plans: int = 24, cost: str = "mass_lost", seed: int = 0,
                policies: Sequence[str] | None = None) -> ProxyReport:
    plans = random_plans(profile, budget=budget, n=n_plans, policies=policies, seed=seed)
    predicted = [predicted_loss(profile, plan, cost=cost) for plan in plans]
    measured = list(measure(plans))
    rho, pvalue = spearmanr(predicted, measured)
    return ProxyReport(budget=budget, cost=cost, spearman=float(rho), pvalue=float(pvalue),
                       predicted=predicted, measured=measured)


def check_proxy_on(lm: LoadedModel, profile: Profile, samples: Sequence[Sample], *, budget: float,
                   n_plans: int = 24, cost: str = "mass_lost", seed: int = 0) -> ProxyReport:
    """`check_proxy` with the measured side the end-to-end KL of each random plan on `samples` (the profile's
    policies), on a loaded model that the profile is checked against."""
    profile.check_model(lm.info)
    objective = EndToEndObjective(lm, list(samples), policies=profile.policies, metric="kl",
                                  question_aware=profile.meta.question_aware)
    return check_proxy(profile, objective.many, budget=budget, n_plans=n_plans, cost=cost, seed=seed)
