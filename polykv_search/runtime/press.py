"""PlanPress: a kvpress press that gives every layer its own kvpress scorer and token budget, read from a plan.

The general form of kvpress's PerLayerCompressionPress (one press, per-layer ratios) with a different press
per layer and budgets in tokens. Usable as kvpress presses are:

    with PlanPress.from_file("plan.json")(model):
        model(input_ids=context_ids, past_key_values=cache)
    pipeline("kv-press-text-generation", model=model, tokenizer=tok)(context, question=q, press=press)

Entering the press switches the model to the "polykv_sdpa" attention and leaves it switched, because kvpress's
pipeline decodes after the press context has closed: later forwards then work with per-layer cache lengths,
including forwards of several query tokens. On caches no plan touched it is exactly SDPA.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from kvpress import BasePress
from kvpress.presses.base_press import SUPPORTED_MODELS  # noqa: F401  (kvpress warns for others; so do we)

from polykv_search.calibrate.attention import (
    decoder_layers,
    rotary_for_layer,
    rotary_owner,
)
from polykv_search.policies import POLICIES, check_policy_names, make_press, rank_scores
from polykv_search.policies.scoring import policy_scores
from polykv_search.runtime.attention import use_polykv_attention


@dataclass
class PlanPress(BasePress):
    """policies[l], budgets[l]: layer l's policy name and context tokens kept (None: layer left untouched)."""

    policies: Sequence[str | None]
    budgets: Sequence[int | None]
    params: Sequence[dict[str, Any]] = field(default_factory=list)
    kept_indices: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)  # last prefill, per layer

    def __post_init__(self) -> None:
        if len(self.policies) != len(self.budgets):
            raise ValueError("policies and budgets must have one entry per layer")
        check_policy_names([p for p in self.policies if p is not None] or ["snapkv"])
        params = list(self.params) or [{} for _ in self.policies]
        self._presses = [make_press(p, **(params[i] or {})) if p is not None else None
                         for i, p in enumerate(self.policies)]

    @classmethod
    def from_plan(cls, plan: Any) -> PlanPress:
        """From a polykv_search.plan.Plan (one budget of a plan file)."""
        return cls(policies=list(plan.policies), budgets=list(plan.budgets),
                   params=[dict(entry.params or {}) for entry in plan.layers])

    @classmethod
    def from_file(cls, path: str | Path, *, budget: int | None = None, model: Any = None) -> PlanPress:
        """Load a plan file (validated; checked against `model`'s geometry when given) and pick one budget."""
        from polykv_search.plan import PlanFile

        plan_file = PlanFile.load(path)
        if model is not None:
            from polykv_search.models.loading import _model_info
            from polykv_search.plan.validate import check_matches_model

            check_matches_model(plan_file, _model_info(model, model_id=plan_file.model.id,
                                                       revision=plan_file.model.revision, add_bos=False))
        plan = plan_file.plan_for(budget) if budget is not None else plan_file.plans[0]
        return cls.from_plan(plan)

    def post_init_from_model(self, model: torch.nn.Module) -> None:
        for press in self._presses:
            if press is not None:
                press.post_init_from_model(model)

    def compress(self, module: torch.nn.Module, hidden_states: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor, attentions: torch.Tensor | None, kwargs: dict) -> tuple[torch.Tensor, ...]:
        idx = module.layer_idx
        name, budget, press = self.policies[idx], self.budgets[idx], self._presses[idx]
        if name is None or budget is None or budget >= keys.shape[2]:
            module.polykv_compressed = False
            return keys, values  # untouched layer, or a budget at least the context: keep everything
        module.polykv_compressed = True
        if attentions is not None and POLICIES[name].needs_attentions:
            scores = rank_scores(name, press, module, hidden_states, keys, values, attentions, kwargs)
        else:
            scores, _ = policy_scores(name, press, module, hidden_states, keys, values, kwargs)
        indices = scores.topk(int(budget), dim=-1).indices  # (B, H_kv, b), kvpress's own selection rule
        self.kept_indices[idx] = indices.detach().cpu()
        gather = indices.unsqueeze(-1).expand(-1, -1, -1, module.head_dim)  # (B, H_kv, b, D)
        return keys.gather(2, gather).contiguous(), values.gather(2, gather).contiguous()

    @contextmanager
    def __call__(self, model: torch.nn.Module) -> Iterator[None]:
        layers = decoder_layers(model)
        if len(layers) != len(self.policies):
            from polykv_search.errors import PlanError

            raise PlanError(f"the plan has {len(self.policies)} layers but the model has {len(layers)}; "
                            "use a plan made from a profile of this model")
        self.kept_indices.clear()
        owner = rotary_owner(model)
        types = list(getattr(model.config.get_text_config(), "layer_types", None) or ["full_attention"] * len(layers))
        use_polykv_attention(model)  # kept after exit: kvpress's pipeline decodes outside the press context
        with super().__call__(model):
            for layer, kind in zip(layers, types):  # kvpress set the shared rotary; Gemma-3 needs its layer type
                layer.self_attn.rotary_emb = rotary_for_layer(owner, kind)
            yield


def apply_plan(model: torch.nn.Module, plan: Any):
    """Context manager: compress the cache after prefill as `plan` says; `model.generate` and manual decode
    loops (pass position_ids, as kvpress's pipeline does) work with the per-layer cache lengths.

        with apply_plan(model, plan):
            out = model.generate(**inputs, max_new_tokens=32)
    """
    press = plan if isinstance(plan, PlanPress) else PlanPress.from_plan(plan)
    return press(model)
