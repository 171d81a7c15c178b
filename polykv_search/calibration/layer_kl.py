"""calibrate's optional slower modes: the isolated effect of compressing one layer, or one KV head, on the output
distribution.

For each compressible layer, policy and budget of the grid, only that layer keeps its policy's top-b context
tokens; the question and reference answer are teacher-forced and the KL divergence to the full cache is averaged
over the answer tokens. The same probe also gives how much the reference answer's negative log-likelihood rises
(layer_nll: the loss on the reference tokens themselves, where the KL weighs the whole output distribution).
The probes reuse the prefill's cache and rankings (no extra prefill) and run as batch rows of the evaluation
engine, so they are the same measurement as `evaluate`'s KL, one layer at a time. `--head-kl` does the same one KV
head at a time (every other head of every layer keeps everything): the cost a per-head plan is optimized on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from polykv_search.data import PromptParts, Sample
from polykv_search.engine import PrefillEngine, PrefillState
from polykv_search.models.info import ModelInfo
from polykv_search.plan import HeadPlan, LayerPlan, Plan, SearchInfo

PROBE = SearchInfo(solver="probe", status="one layer changed")


def probe_plans(info: ModelInfo, policies: Sequence[str], budgets: Sequence[int], n_context: int, *,
                background: Plan | None = None) -> list[tuple[tuple[int, int, int], Plan]]:
    """((layer, policy index, budget index), plan changing only that layer) for every grid cell.

    Without a `background` every other layer keeps the full cache and budgets at or above the context length are
    left out (they keep everything and cost nothing); with one, every other layer keeps the background's policy
    and budget and every cell is probed (keeping everything in one layer is then a measurable gain)."""
    base = background or Plan.full(info)
    probes = []
    for layer in info.compressible_layers:
        for p, policy in enumerate(policies):
            for g, budget in enumerate(budgets):
                if budget >= n_context and background is None:
                    continue
                layers = list(base.layers)
                layers[layer] = LayerPlan.of(layer, policy, int(budget))
                probes.append(((layer, p, g), Plan.build(info, layers=layers, search=PROBE,
                                                         average_budget=base.average_budget or None)))
    return probes


def probe_state(engine: PrefillEngine, sample: Sample, parts: PromptParts, cache,
                rankings: dict[int, dict[str, torch.Tensor]]) -> PrefillState:
    """The engine's state for a prefill run by calibrate: `cache` is the full cache right after the context prefill
    (not modified) and `rankings` the layers' policy scores from that prefill, (H_kv, T) each."""
    return engine.state_from(sample, parts, cache, {idx: {k: v.float() for k, v in ranks.items()}
                                                    for idx, ranks in rankings.items()})


def layer_probes(engine: PrefillEngine, state: PrefillState, *, info: ModelInfo, policies: Sequence[str],
                 budgets: Sequence[int], batch_size: int = 4) -> dict[str, torch.Tensor]:
    """{"layer_kl": mean KL(full || one layer compressed) over the answer tokens, "layer_nll": mean rise of the
    reference tokens' negative log-likelihood}, each (L, 1, P, G); NaN on layers not probed.

    Every row but one layer holds the whole context, so rows are costly: batches of 4 measured fastest (60 probes
    on SmolLM2 at 2k tokens: 8.7 s, against 13.4 s in 16s and 11.9 s one by one); each row's forward starts at its
    compressed layer (the engine keeps the full cache's hidden states below it).
    """
    out = {kind: torch.full((info.num_layers, 1, len(policies), len(budgets)), float("nan"))
           for kind in ("layer_kl", "layer_nll")}
    for layer in info.compressible_layers:
        for table in out.values():
            table[layer] = 0.0  # budgets at or above the context length keep everything
    if not state.parts.answer_ids:
        return out
    answer = torch.tensor(state.parts.answer_ids, device=state.full_logprobs.device)
    full_nll = float(-state.full_logprobs.gather(-1, answer[:, None]).mean())
    probes = probe_plans(info, policies, budgets, state.n_context)
    metrics = engine.answer_metrics_many(state, [plan for _, plan in probes], batch_size=batch_size)
    for ((layer, p, g), _), measured in zip(probes, metrics):
        out["layer_kl"][layer, 0, p, g] = measured["kl"]
        out["layer_nll"][layer, 0, p, g] = measured["nll"] - full_nll
    return out


def head_probes(engine: PrefillEngine, state: PrefillState, *, info: ModelInfo, policies: Sequence[str],
                budgets: Sequence[int], batch_size: int = 4, only: torch.Tensor | None = None) -> torch.Tensor:
    """head_kl (L, H_kv, P, G): mean KL(full || only that KV head compressed) over the answer tokens, for every KV
    head of every compressible layer, policy and budget of the grid; 0 where the budget keeps the whole context, NaN
    on layers not probed. Each row starts at its head's layer from the full cache's hidden states.

    `only` (L, H_kv, P, G) bool: probe just those cells; every other cell is NaN."""
    heads = info.num_kv_heads
    out = torch.full((info.num_layers, heads, len(policies), len(budgets)), float("nan"))
    for layer in info.compressible_layers:
        out[layer] = 0.0  # budgets at or above the context length keep everything
    if only is not None:
        out[~only.bool()] = float("nan")
    if not state.parts.answer_ids:
        return out
    cells, plans = [], []
    full = Plan.full(info)
    for layer in info.compressible_layers:
        for h in range(heads):
            for p, policy in enumerate(policies):
                for g, budget in enumerate(budgets):
                    if budget >= state.n_context or (only is not None and not bool(only[layer, h, p, g])):
                        continue
                    entries = [HeadPlan.full()] * heads
                    entries[h] = HeadPlan.of(policy, int(budget))
                    layers = list(full.layers)
                    layers[layer] = LayerPlan(index=layer, policy=None, heads=tuple(entries))
                    cells.append((layer, h, p, g))
                    plans.append(Plan.build(info, layers=layers, search=PROBE))
    for (layer, h, p, g), measured in zip(cells, engine.answer_metrics_many(state, plans, batch_size=batch_size)):
        out[layer, h, p, g] = measured["kl"]
    return out
