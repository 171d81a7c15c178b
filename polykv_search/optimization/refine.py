"""optimize --max-changes K: refine the plan a profile was probed around, changing at most K of its layers.

`calibrate --around-plan` measures every (layer, policy, budget) cell with every other layer at the plan. Each cell
is exact for a plan that changes that one layer; their sum predicts a plan that changes many layers at once
poorly (SmolLM2 at 128 tokens: the unconstrained DP changed 25 of 30 layers, predicted keeping 0.89 of the output
distribution and measured 0.33 on the calibration samples). A trust region keeps the prediction near what was
measured: every layer stays at the plan except at most K, each changed layer takes one measured cell, and the
total is at most the plan's (tokens left over go to the changed layer keeping the most). The exact optimum of
that problem comes from a DP over layers whose state is (layers changed so far, tokens used relative to the plan).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import reduce

import numpy as np

from polykv_search.calibration.around import Background, background_plan
from polykv_search.calibration.profile import AROUND_KL, Profile
from polykv_search.errors import ConfigError
from polykv_search.plan import LayerPlan, Plan, SearchInfo


@dataclass(frozen=True)
class Refinement:
    layers: tuple[LayerPlan, ...]  # the refined plan's entries, one per model layer
    predicted: float  # sum of the changed cells' costs: the predicted change of the share of the output lost
    changed: list[int]  # the layers moved off the plan
    plan: str  # the name of the plan refined (calibrate --around-plan's file)


    def to_plan(self, profile: Profile, *, average_budget: float, max_changes: int, seconds: float,
                profile_signature: str | None = None) -> Plan:
        """The refined plan with its provenance (the predicted change is its objective)."""
        search = SearchInfo(solver="refine", status="optimal", objective=self.predicted,
                            profile_signature=profile_signature, seconds=round(seconds, 4),
                            notes=f"plan {self.plan} with at most {max_changes} layers changed: "
                                  f"{', '.join(map(str, self.changed)) or 'none'}")
        return Plan.build(profile.model, average_budget=average_budget, layers=self.layers, search=search)


def _plan_background(profile: Profile, average_budget: float) -> Background:
    """The `calibrate --around-plan` background measured at `average_budget` (a clear error otherwise)."""
    for entry in profile.around_backgrounds():
        if float(entry["budget"]) == float(average_budget):
            if entry.get("kind") == "uniform":
                raise ConfigError(f"--max-changes refines the plan a profile was probed around, but this profile's "
                                  f"background at {average_budget:g} is the uniform policy {entry['name']}; "
                                  "calibrate with --around-plan PLAN")
            return entry
    raise ConfigError(f"--max-changes needs around_kl probes at {average_budget:g} tokens per layer; calibrate with "
                      f"--around-plan PLAN (a plan with a rung at {average_budget:g})")


def refine(profile: Profile, *, average_budget: float, max_changes: int,
           policies: Sequence[str] | None = None) -> Refinement:
    """The best plan that differs from the profile's plan background in at most `max_changes` layers."""
    if max_changes < 0:
        raise ConfigError(f"--max-changes {max_changes} must be 0 or more")
    entry = _plan_background(profile, average_budget)
    base = background_plan(entry)
    names = list(profile.policies) if policies is None else list(policies)
    unknown = [p for p in names if p not in profile.policies]
    if unknown:
        raise ConfigError(f"policy {', '.join(unknown)} is not in the profile; known: {', '.join(profile.policies)}")
    table = profile.layer_costs(AROUND_KL, budget=average_budget).double().numpy()  # (L, P, G)
    layers = profile.model.compressible_layers
    base_policies, base_budgets = list(base.policies), list(base.budgets)
    grid = [int(b) for b in profile.budgets]
    options = []  # per layer: (cost, delta, policy, budget) of every measured cell that changes it
    for layer in layers:
        cells = []
        for name in names:
            p = profile.policies.index(name)
            for g, level in enumerate(grid):
                cost = table[layer, p, g]
                same = name == base_policies[layer] and level == base_budgets[layer]
                if math.isfinite(cost) and not same:
                    cells.append((float(cost), level - int(base_budgets[layer]), name, level))
        options.append(cells)
    value, taken = trust_region([[(cost, delta) for cost, delta, _, _ in cells] for cells in options], max_changes)
    out = list(base.layers)
    changed = []
    for position, index in taken:
        layer = layers[position]
        _, _, name, level = options[position][index]
        out[layer] = LayerPlan.of(layer, name, level)
        changed.append(layer)
    left = sum(int(base_budgets[i]) for i in layers) - sum(int(out[i].budget) for i in layers)
    if left > 0:  # the plan's total exactly: the rest to the changed layer keeping the most
        widest = max(changed, key=lambda i: out[i].budget)
        out[widest] = LayerPlan.of(widest, out[widest].policy, out[widest].budget + left)
    return Refinement(layers=tuple(out), predicted=value, changed=sorted(changed), plan=str(entry["name"]))


def trust_region(options: Sequence[Sequence[tuple[float, int]]],
                 max_changes: int) -> tuple[float, list[tuple[int, int]]]:
    """The cheapest change of a plan made of units (layers, or KV heads): each unit keeps its entry or takes one of
    its `options`, (predicted cost, token change); at most `max_changes` units change and the net token change is at
    most 0. Returns (the summed cost, [(unit, option index)] of the units changed). Exact: a DP over the units whose
    state is (changes so far, tokens relative to the plan, in units of the changes' gcd)."""
    unit = reduce(math.gcd, [abs(d) for cells in options for _, d in cells] + [0]) or 1
    k_max = min(max_changes, len(options))
    reach = sum(sorted((max((abs(d) for _, d in cells), default=0) for cells in options), reverse=True)
                [:k_max]) // unit
    width = 2 * reach + 1  # states: tokens used relative to the plan, -reach .. +reach units
    best = np.full((k_max + 1, width), np.inf)
    best[0, reach] = 0.0
    picks = []  # per unit: (K+1, width) option index taken to reach that state, -1 = unchanged
    for cells in options:
        new, pick = best.copy(), np.full((k_max + 1, width), -1, dtype=np.int64)
        for index, (cost, delta) in enumerate(cells):
            shift = delta // unit
            lo, hi = max(0, -shift), min(width, width - shift)  # source states whose target stays in range
            if lo >= hi:
                continue
            moved = best[:-1, lo:hi] + cost  # (K, n): one more change
            target = new[1:, lo + shift:hi + shift]
            better = moved < target
            target[better] = moved[better]
            pick[1:, lo + shift:hi + shift][better] = index
        best = new
        picks.append(pick)
    within = best[:, :reach + 1]  # at most the plan's total
    k, state = np.unravel_index(np.argmin(within), within.shape)
    value = float(within[k, state])
    taken = []
    for position in reversed(range(len(options))):
        index = int(picks[position][k, state])
        if index < 0:
            continue
        taken.append((position, index))
        k, state = k - 1, state - options[position][index][1] // unit
    return value, taken[::-1]
