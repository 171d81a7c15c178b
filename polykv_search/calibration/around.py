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
from typing import Any

import torch

from polykv_search.calibration.layer_kl import probe_plans
from polykv_search.calibration.profile import AROUND_BASE, AROUND_KL
from polykv_search.data import Sample
from polykv_search.engine import PrefillEngine, PrefillState, mean_over_tasks
from polykv_search.errors import ConfigError
from polykv_search.models.info import ModelInfo
from polykv_search.plan import Plan, PlanFile, uniform_plan
from polykv_search.policies import policy_params

Background = dict[str, Any]  # {"budget", "name", "kept", "plan"}: how a profile header stores one (JSON)


def background(budget: int, name: str, plan: Plan, kept: float | None = None, *, kind: str = "plan") -> Background:
    """A background as stored in the profile header: its target budget, a name (the uniform policy or the plan
    file's stem), where it came from (`kind`: "plan" for --around-plan, "uniform" for a uniform policy), the share of
    the output it keeps on the calibration samples when measured, and the plan."""
    return {"budget": int(budget), "name": name, "kind": kind, "kept": kept, "plan": plan.to_dict()}


def background_plan(entry: Background) -> Plan:
    """The plan a stored background runs."""
    return Plan.from_dict(entry["plan"])


def plan_backgrounds(plan_file: PlanFile, *, budgets: Sequence[int], policies: Sequence[str], name: str,
                     ) -> list[Background]:
    """The plan's rungs at `budgets` as backgrounds; every rung's policies must be calibrated ones with their
    registered parameters (the probes reuse calibrate's rankings)."""
    rungs = {float(p.average_budget): p for p in plan_file.plans}
    missing = [b for b in budgets if float(b) not in rungs]
    if missing:
        have = ", ".join(f"{b:g}" for b in sorted(rungs))
        raise ConfigError(f"--around-plan {name} has no rung at average budget {', '.join(map(str, missing))} "
                          f"(it has {have}); pass --around with some of those budgets")
    chosen = []
    for budget in budgets:
        plan = rungs[float(budget)]
        if plan.per_head:
            raise ConfigError(f"--around-plan {name} gives KV heads budgets of their own at {budget}; probes around "
                              "a plan change one layer at a time and take per-layer plans only")
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
        chosen.append(background(budget, name, plan))
    return chosen


def choose_backgrounds(engine: PrefillEngine, samples: Sequence[Sample], *, info: ModelInfo, budgets: Sequence[int],
                       policies: Sequence[str], progress: Callable[[int], None] | None = None) -> list[Background]:
    """For each target budget, the uniform policy keeping the largest mean share exp(-KL) of the full cache's output
    distribution over the samples (the task means averaged, so each task counts the same): one prefill and
    len(budgets) x len(policies) teacher-forced rows per sample."""
    plans = [uniform_plan(info, policy=policy, budget=budget) for budget in budgets for policy in policies]
    tasks, rows = [], []
    for index, sample in enumerate(samples):
        state = engine.prefill(sample)
        if state.full_logprobs is not None:
            tasks.append(sample.task)
            rows.append(engine.answer_metrics_many(state, plans))
        if progress:
            progress(index)
    if not rows:
        return [background(b, policies[0], uniform_plan(info, policy=policies[0], budget=b), kind="uniform")
                for b in budgets]
    kept = [1.0 - m["lost"] for m in mean_over_tasks(tasks, rows)]
    chosen = []
    for b, budget in enumerate(budgets):
        row = kept[b * len(policies):(b + 1) * len(policies)]
        best = max(range(len(policies)), key=row.__getitem__)  # ties: the earlier policy
        chosen.append(background(budget, policies[best], plans[b * len(policies) + best], kept=round(row[best], 6),
                                 kind="uniform"))
    return chosen


def around_probes(engine: PrefillEngine, state: PrefillState, *, info: ModelInfo, policies: Sequence[str],
                  budgets: Sequence[int], backgrounds: Sequence[Background],
                  batch_size: int = 16) -> dict[str, torch.Tensor]:
    """{AROUND_KL: (L, A, P, G) KL of each background with one layer's policy and budget changed (NaN on layers not
    probed), AROUND_BASE: (A,) KL of each background}, A = len(backgrounds)."""
    kl = torch.full((info.num_layers, len(backgrounds), len(policies), len(budgets)), float("nan"))
    base = torch.zeros(len(backgrounds))
    if not state.parts.answer_ids:
        for layer in info.compressible_layers:
            kl[layer] = 0.0
        return {AROUND_KL: kl, AROUND_BASE: base}
    for a, entry in enumerate(backgrounds):
        reference = background_plan(entry)
        probes = probe_plans(info, policies, budgets, state.n_context, background=reference)
        measured = engine.answer_metrics_many(state, [reference] + [plan for _, plan in probes], batch_size=batch_size,
                                              reference=reference)  # a probe's forward starts at its layer
        base[a] = measured[0]["kl"]
        for ((layer, p, g), _), metrics in zip(probes, measured[1:]):
            kl[layer, a, p, g] = metrics["kl"]
    return {AROUND_KL: kl, AROUND_BASE: base}
