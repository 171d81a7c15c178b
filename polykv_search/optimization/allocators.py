"""Known budget allocators to compare plans with: PyramidKV's linear pyramid and CAKE's preference-weighted budgets
per layer, and Ada-KV's budgets per KV head within each layer.

PyramidKV and CAKE return a Plan whose compressible-layer budgets sum exactly to round(budget x compressible
layers), with one policy on every layer (the uniform plan is `polykv_search.plan.uniform_plan`); Ada-KV allocates
from one input's scores, so its plan is per sample.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import Any

import torch

from polykv_search.calibration.profile import Profile
from polykv_search.errors import ConfigError, ProfileError
from polykv_search.models.info import ModelInfo
from polykv_search.plan import HeadPlan, LayerPlan, Plan, SearchInfo, exact_integer_budgets
from polykv_search.policies import POLICIES, check_policy_names
from polykv_search.plan.uniform import checked_budget, plan_of_budgets, seconds_since

logger = logging.getLogger(__name__)


def pyramidkv_plan(model: ModelInfo, *, policy: str = "snapkv", budget: float, window: int = 64,
                   beta: float = 20, max_budget: int | None = None,
                   params: dict[str, Any] | None = None) -> Plan:
    """PyramidKV: a window of `window` tokens on every layer plus a linear pyramid of the rest.

    Over the compressible layers the pyramid runs from max = 2(B - w) - min down to min = (B - w) / beta
    (kvpress's PyramidKVPress.get_layer_budget with max_capacity_prompt = B), so the average is B.
    kvpress's cap: if the top layer would exceed `max_budget` (the context length), max = max_budget - w and
    min = 2(B - w) - max. B <= w leaves nothing to shape: the plan is uniform. `window=0` gives kvpress's
    budgets for a press built with compression ratio 1 - B / context; unlike kvpress there is no fallback to
    uniform when min < w (kvpress falls back below B = (beta + 1) w).
    """
    started = time.perf_counter()
    if window < 0 or beta < 1:
        raise ConfigError(f"PyramidKV needs window >= 0 and beta >= 1, got window={window}, beta={beta}; "
                          "the defaults are window=64, beta=20")
    n, total = checked_budget(model, policy=policy, budget=budget, max_budget=max_budget)
    notes = f"pyramidkv window={window} beta={beta}" + (f" max_budget={max_budget}" if max_budget else "")
    if budget <= window or n == 1:
        logger.info("PyramidKV at budget %s with window %s over %d layer(s) leaves no pyramid; the plan is "
                       "uniform", budget, window, n)
        shares = [1.0] * n
        notes += " (uniform: nothing to shape)"
    else:
        low = (budget - window) / beta
        high = 2 * (budget - window) - low
        if max_budget is not None and high + window > max_budget:
            high = max_budget - window
            low = 2 * (budget - window) - high
        step = (high - low) / (n - 1)
        shares = [high - i * step + window for i in range(n)]  # decreasing with depth
    budgets = exact_integer_budgets(shares, total, cap=max_budget)
    return plan_of_budgets(model, policy=policy, params=params, budget=budget, budgets=budgets,
                     search=SearchInfo(solver="pyramidkv", status="heuristic", seconds=seconds_since(started),
                                       notes=notes))


def cake_plan(model: ModelInfo, profile: Profile, *, policy: str = "snapkv", budget: float, tau1: float = 1.0,
              tau2: float = 1.0, max_budget: int | None = None, profile_signature: str | None = None,
              params: dict[str, Any] | None = None) -> Plan:
    """CAKE: budget_l proportional to P_l = H_l^(1/tau1) * V_l^(1/tau2), from the profile's per-layer
    window entropy H and variance V over compressible layers, capped at `max_budget` and repaired to sum exactly.
    """
    started = time.perf_counter()
    if not (tau1 > 0 and tau2 > 0 and math.isfinite(tau1) and math.isfinite(tau2)):
        raise ConfigError(f"CAKE needs tau1 > 0 and tau2 > 0, got tau1={tau1}, tau2={tau2}; the default is 1.0")
    _, total = checked_budget(model, policy=policy, budget=budget, max_budget=max_budget)
    preferences = cake_preferences(model, profile, tau1=tau1, tau2=tau2)
    budgets = exact_integer_budgets(preferences, total, cap=max_budget)
    notes = f"cake tau1={tau1} tau2={tau2}" + (f" max_budget={max_budget}" if max_budget else "")
    return plan_of_budgets(model, policy=policy, params=params, budget=budget, budgets=budgets,
                     search=SearchInfo(solver="cake", status="heuristic", profile_signature=profile_signature,
                                       seconds=seconds_since(started), notes=notes))


def cake_preferences(model: ModelInfo, profile: Profile, *, tau1: float = 1.0, tau2: float = 1.0) -> list[float]:
    """CAKE's layer preference P_l = H_l^(1/tau1) * V_l^(1/tau2) for each compressible layer of `model`."""
    info = profile.model
    if info.num_layers != model.num_layers or list(info.layer_types) != list(model.layer_types):
        raise ProfileError(f"profile was calibrated on {info.model_id} ({info.num_layers} layers) but the plan is "
                           f"for {model.model_id} ({model.num_layers} layers); calibrate this model first")
    signals = profile.layer_signals()
    missing = [name for name in ("entropy", "variance") if name not in signals]
    if missing:
        raise ProfileError(f"profile has no {' or '.join(missing)} signal; re-run `polykv-search calibrate` "
                           "to record CAKE's signals")
    entropy, variance = signals["entropy"].tolist(), signals["variance"].tolist()  # (L,), NaN on sliding layers
    preferences = []
    for layer in model.compressible_layers:
        h, v = entropy[layer], variance[layer]
        if not (math.isfinite(h) and math.isfinite(v)) or h < 0 or v < 0:
            raise ProfileError(f"profile signals of layer {layer} are entropy={h}, variance={v}; CAKE needs finite "
                               "values >= 0 on every compressible layer: re-run calibrate")
        preferences.append(h ** (1 / tau1) * v ** (1 / tau2))
    return preferences


def adakv_plan(info: ModelInfo, scores: Mapping[int, torch.Tensor], *, policy: str = "snapkv", budget: int,
               n_context: int, alpha_safeguard: float = 0.2) -> Plan:
    """Ada-KV (kvpress's AdaKVPress around `policy`): in each layer, the `budget` x KV heads best-scored tokens
    across all its heads, each head keeping at least alpha_safeguard x budget of its own best; written as a
    per-head plan with each head's count. `scores[layer]`: the policy's (H_kv, T) scores of one sample's prefill,
    so the plan is that sample's (Ada-KV allocates from the scores of each input). Tokens whose scores tie across
    the cut (SnapKV's observation window, when the budget is below it) may be split between heads otherwise than
    kvpress splits them; both keep the same number of entries."""
    check_policy_names([policy])
    if POLICIES[policy].ranking != "score":
        raise ConfigError(f"Ada-KV compares scores across KV heads; {policy!r} ranks by position (sinks and recency), "
                          "the same in every head: use a scorer such as snapkv, tova or expected_attention")
    if budget < 1 or not 0 < alpha_safeguard <= 1:
        raise ConfigError(f"Ada-KV needs a budget of at least 1 token per layer and 0 < alpha_safeguard <= 1, got "
                          f"budget={budget}, alpha_safeguard={alpha_safeguard}")
    layers = []
    for idx in info.compressible_layers:
        if budget >= n_context:  # every head keeps everything
            layers.append(LayerPlan.of(idx, policy, budget))
            continue
        layer_scores = scores[idx].float().clone()  # (H_kv, T)
        heads, length = layer_scores.shape
        n_safe = max(1, int(budget * alpha_safeguard))  # kvpress's safeguard: a head's own best are always kept
        safe = layer_scores.topk(n_safe, dim=-1).indices  # (H_kv, n_safe)
        layer_scores.scatter_(-1, safe, torch.finfo(layer_scores.dtype).max)
        kept = layer_scores.reshape(-1).topk(budget * heads).indices // length  # the KV head of each kept entry
        counts = torch.bincount(kept, minlength=heads).tolist()  # each >= n_safe >= 1
        layers.append(LayerPlan(index=idx, policy=None, heads=tuple(HeadPlan.of(policy, c) for c in counts)))
    return Plan.build(info, average_budget=budget, layers=layers,
                      search=SearchInfo(solver="adakv", status="heuristic", notes=f"adakv alpha={alpha_safeguard}"))
