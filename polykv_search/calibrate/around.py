"""calibrate --around: each layer's probes measured at an operating point instead of against the full cache.

The isolated layer KL (`--layer-kl`) compresses one layer while every other keeps everything. Those costs add up
to less than the damage of compressing all layers at once, and at tight budgets the exact solver then spends half
the total on one layer and starves the rest. Here every other layer keeps a background instead: one uniform
policy at the target average budget B (the one that keeps the most of the output distribution on the calibration
samples). Each (layer, policy, budget) cell is the KL to the full cache of "the background with that one layer
changed", so the costs describe the loss around the plan the optimizer starts from, one background per target
budget. Rows hold small caches, so a probe costs about as much as a decoding pass of the answer, and less: below
its changed layer a row is the background, whose hidden states are kept, so its forward starts at that layer.

With `--around-plan P` the background at B is plan P's rung at B instead (its policy and budget per layer): the
probes then describe the changes one layer at a time around a plan already found, and the optimizer refines it
(the plan's own choice in a layer costs nothing; another choice costs or gains what it measured).

The optimizer's cost (`Profile.layer_costs("around_kl")`) is the share of the output distribution lost,
exp(-KL_background) - exp(-KL_probe), not the KL difference: the share saturates, so samples that every plan at
that budget gets wrong (a needle no layer keeps) do not outweigh the ones a plan can still change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from polykv_search.calibrate.layer_kl import probe_methods
from polykv_search.calibrate.profile import AROUND_BASE, AROUND_KL
from polykv_search.data import Sample
from polykv_search.errors import ConfigError
from polykv_search.evaluate.engine import EvaluationEngine, Method, PrefillState
from polykv_search.optimize.objective import mean_over_tasks

if TYPE_CHECKING:
    from polykv_search.plan import PlanFile


def uniform_background(num_layers: int, layers: Sequence[int], policy: str, budget: int,
                       ) -> tuple[list[str | None], list[int | None]]:
    """Per-layer policies and budgets of one policy at `budget` on every compressible layer."""
    names: list[str | None] = [None] * num_layers
    sizes: list[int | None] = [None] * num_layers
    for layer in layers:
        names[layer], sizes[layer] = policy, int(budget)
    return names, sizes


def background_layers(background: dict, num_layers: int, layers: Sequence[int],
                      ) -> tuple[list[str | None], list[int | None]]:
    """Per-layer policies and budgets of a stored background: a plan's rung, or one uniform policy."""
    if "policies" in background:
        return list(background["policies"]), list(background["budgets"])
    return uniform_background(num_layers, layers, background["policy"], background["budget"])


def plan_backgrounds(plan_file: PlanFile, *, budgets: Sequence[int], policies: Sequence[str], name: str,
                     ) -> list[dict]:
    """The plan's rungs at `budgets` as backgrounds [{"budget", "plan", "policies", "budgets"}]; every rung's
    policies must be calibrated ones with their registered parameters (the probes reuse calibrate's rankings)."""
    from polykv_search.plan.params import policy_params

    rungs = {float(p.average_budget): p for p in plan_file.plans}
    missing = [b for b in budgets if float(b) not in rungs]
    if missing:
        have = ", ".join(f"{b:g}" for b in sorted(rungs))
        raise ConfigError(f"--around-plan {name} has no rung at average budget {', '.join(map(str, missing))} "
                          f"(it has {have}); pass --around with some of those budgets")
    chosen = []
    for budget in budgets:
        plan = rungs[float(budget)]
        for layer in plan.layers:
            if layer.policy is None:
                continue
            if layer.policy not in policies:
                raise ConfigError(f"--around-plan {name} uses {layer.policy} at layer {layer.index} (budget "
                                  f"{budget}), which is not calibrated; add it to --policies")
            if layer.params != policy_params(layer.policy):
                raise ConfigError(f"--around-plan {name}: layer {layer.index} runs {layer.policy} with parameters "
                                  f"{layer.params}, not the registered ones calibrate measures; use a plan with "
                                  "registered parameters")
        chosen.append({"budget": int(budget), "plan": name, "policies": plan.policies, "budgets": plan.budgets})
    return chosen


def choose_backgrounds(engine: EvaluationEngine, samples: Sequence[Sample], *, budgets: Sequence[int],
                       policies: Sequence[str], num_layers: int, layers: Sequence[int],
                       progress: Callable[[int], None] | None = None) -> list[dict]:
    """For each target budget, the uniform policy keeping the largest mean share exp(-KL) of the full cache's output
    distribution over the samples (the task means averaged, so each task counts the same): one prefill and
    len(budgets) x len(policies) teacher-forced rows per sample. Returns [{"budget", "policy", "kept"}]."""
    methods = [Method(f"{policy}@{budget}", "uniform", int(budget),
                      *map(tuple, uniform_background(num_layers, layers, policy, budget)))
               for budget in budgets for policy in policies]
    tasks, rows = [], []
    for index, sample in enumerate(samples):
        state = engine.prefill(sample)
        if state.full_logprobs is not None:
            tasks.append(sample.task)
            rows.append(engine.answer_metrics_many(state, methods))
        if progress:
            progress(index)
    if not rows:
        return [{"budget": int(b), "policy": policies[0], "kept": None} for b in budgets]
    kept = [1.0 - m["lost"] for m in mean_over_tasks(tasks, rows)]
    chosen = []
    for b, budget in enumerate(budgets):
        row = kept[b * len(policies):(b + 1) * len(policies)]
        best = max(range(len(policies)), key=row.__getitem__)  # ties: the earlier policy
        chosen.append({"budget": int(budget), "policy": policies[best], "kept": round(row[best], 6)})
    return chosen


def around_probes(engine: EvaluationEngine, state: PrefillState, *, num_layers: int, layers: Sequence[int],
                  policies: Sequence[str], budgets: Sequence[int], backgrounds: Sequence[dict],
                  batch_size: int = 16) -> dict[str, torch.Tensor]:
    """{AROUND_KL: (L, A, P, G) KL of each background with one layer's policy and budget changed (NaN on layers not
    probed), AROUND_BASE: (A,) KL of each background}, A = len(backgrounds)."""
    kl = torch.full((num_layers, len(backgrounds), len(policies), len(budgets)), float("nan"))
    base = torch.zeros(len(backgrounds))
    if not state.parts.answer_ids:
        for layer in layers:
            kl[layer] = 0.0
        return {AROUND_KL: kl, AROUND_BASE: base}
    for a, background in enumerate(backgrounds):
        names, sizes = background_layers(background, num_layers, layers)
        probes = probe_methods(num_layers, layers, policies, budgets, state.n_context, background=(names, sizes))
        reference = Method("background", "uniform", int(background["budget"]), tuple(names), tuple(sizes))
        measured = engine.answer_metrics_many(state, [reference] + [m for _, m in probes], batch_size=batch_size,
                                              reference=reference)  # a probe's forward starts at its layer
        base[a] = measured[0]["kl"]
        for ((layer, p, g), _), metrics in zip(probes, measured[1:]):
            kl[layer, a, p, g] = metrics["kl"]
    return {AROUND_KL: kl, AROUND_BASE: base}
