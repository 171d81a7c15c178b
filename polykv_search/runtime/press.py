"""PlanPress: a kvpress press that gives every layer its own kvpress scorer and token budget, read from a plan.

The general form of kvpress's PerLayerCompressionPress (one press, per-layer ratios) with a different press
per layer and budgets in tokens. Usable as kvpress presses are, and with plain transformers through `apply_plan`:

    press = PlanPress.from_file("plan.json", budget=256, model=model)
    with polykv_attention(model):                       # restores the model's attention when the block ends
        answer = pipeline("kv-press-text-generation", model=model, tokenizer=tok)(context, question=q,
                                                                              press=press)["answer"]
    with apply_plan(model, press):                      # transformers: generate, manual decode loops
        out = model.generate(**inputs, max_new_tokens=32)

kvpress's pipeline decodes after the press context has closed, on caches whose layers hold different numbers of
tokens; that needs the "polykv_sdpa" attention (exactly SDPA on caches no plan touched). So entering the press
switches the model to it and leaves it switched: wrap the pipeline call in `polykv_attention(model)` to get the
model's own attention back afterwards. Everything else the press sets (hooks, the `rotary_emb` kvpress's scorers
read) is removed when its context exits; `apply_plan` restores the attention too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from kvpress import BasePress
from kvpress.presses.base_press import is_prefilling

from polykv_search.errors import PlanError
from polykv_search.models.anatomy import (
    decoder_layers,
    restore_rotaries,
    rotary_for_layer,
    rotary_owner,
    saved_rotaries,
)
from polykv_search.models.info import model_info
from polykv_search.plan import Plan, PlanFile, load_plan
from polykv_search.plan.named import warn_other_setting
from polykv_search.plan.plan import rung_for_length
from polykv_search.policies import POLICIES
from polykv_search.policies.presses import make_press, rank_scores
from polykv_search.policies.scoring import policy_scores
from polykv_search.runtime.attention import polykv_attention, use_polykv_attention
from polykv_search.runtime.ragged import RaggedLayer

logger = logging.getLogger(__name__)


@dataclass
class PlanPress(BasePress):
    """Compress each layer's cache after its prefill as `plan` says (one budget of a plan file). `rungs`: that
    budget's rungs, one per range of prompt lengths (schema 2.1); each prefill is then compressed by the rung whose
    range holds its length (the nearest otherwise; a strict rung refuses prompts outside its range)."""

    plan: Plan
    # the last prefill's kept positions: (B, H_kv, b) for a per-layer entry, one (b_h,) tensor per KV head otherwise
    kept_indices: dict[int, torch.Tensor | list[torch.Tensor]] = field(default_factory=dict, repr=False)
    rungs: tuple[Plan, ...] = ()

    def __post_init__(self) -> None:
        self.rungs = tuple(self.rungs) or (self.plan,)
        self._variants = [_RungPresses.of(rung) for rung in self.rungs]
        self._presses, self._head_presses = self._variants[0].presses, self._variants[0].head_presses
        self._warned = False

    @classmethod
    def from_file(cls, path: str | Path, *, budget: float | None = None, model: Any = None,
                  question_aware: bool | None = None) -> PlanPress:
        """Load a plan file (validated; checked against `model`'s geometry when given) and pick one budget
        (default: the file's first), with its rungs for every range of prompt lengths. `question_aware`: the
        setting the caller prompts in (the question in the compressed context, as kvpress's `compress_questions`,
        or passed after it); a plan made for the other setting is said so once (None: not checked)."""
        plan_file = load_plan(path)
        if model is not None:
            plan_file.check_model(model_info(model, model_id=plan_file.model.id,
                                             revision=plan_file.model.revision))
        if question_aware is not None:
            warn_other_setting([(Path(path).name, plan_file)], question_aware)
        rungs = plan_file.rungs_for(budget if budget is not None else plan_file.budgets[0])
        return cls(rungs[0], rungs=tuple(rungs))

    def _select(self, lengths: list[int]) -> None:
        """Make the rung serving a prefill whose rows hold `lengths` context tokens the active one (one rung for the
        whole batch: rows that fall in different rungs are refused); say once when a prompt is far longer than any
        the rung was made on."""
        chosen = {id(rung): rung for rung in (rung_for_length(self.rungs, n) for n in lengths)}
        if len(chosen) > 1:
            raise PlanError(f"the rows of this batch ({', '.join(map(str, lengths))} context tokens) fall in different "
                            f"rungs of the plan ({'; '.join(r.context.describe() for r in chosen.values() if r.context)}"
                            "); batch prompts of one length range together")
        rung = next(iter(chosen.values()))
        k = next(i for i, candidate in enumerate(self.rungs) if candidate is rung)
        self.plan = rung
        self._presses, self._head_presses = self._variants[k].presses, self._variants[k].head_presses
        longest = max(lengths)
        if rung.context is not None and rung.context.far_beyond(longest) and not self._warned:
            self._warned = True
            logger.warning("a prompt of %d context tokens is far longer than any this plan was made on (%d-%d at "
                           "average budget %g); its choices may not hold there: calibrate on prompts of this length",
                           longest, *rung.context.calibrated, rung.average_budget)

    def post_init_from_model(self, model: torch.nn.Module) -> None:
        for variant in self._variants:
            for press in [*variant.presses.values(), *(press for _, press in variant.head_presses.values())]:
                press.post_init_from_model(model)

    def forward_hook(self, module: torch.nn.Module, input: list[torch.Tensor], kwargs: dict, output: list):
        """After a layer's prefill: kvpress's compression for a per-layer entry of an unpadded batch; for a layer with
        per-head entries, or any full-attention layer of a padded batch, each row's KV heads keep their own top-k of
        that row's real tokens and the cache layer becomes a RaggedLayer holding exactly those (no padding)."""
        hidden = kwargs["hidden_states"]
        if not is_prefilling(kwargs["cache_position"], hidden.shape[1]) or \
                self.plan.layers[module.layer_idx].sliding_window:
            return output  # decoding, or a sliding-window layer (its mask shows only the window; no plan touches it)
        real = real_positions(kwargs.get("attention_mask"), hidden.shape[0], hidden.shape[1])
        self._select([hidden.shape[1]] * hidden.shape[0] if real is None else [int(r.sum()) for r in real])
        layer = self.plan.layers[module.layer_idx]
        if layer.heads is None and real is None:
            return super().forward_hook(module, input, kwargs, output)
        cache = kwargs["past_key_values"]
        dense = cache.layers[module.layer_idx]
        keys, values = dense.keys, dense.values  # (B, H_kv, T, D)
        if layer.heads is not None and len(layer.heads) != keys.shape[1]:
            raise PlanError(f"layer {layer.index} of the plan has {len(layer.heads)} head entries but the model has "
                            f"{keys.shape[1]} KV heads; use a plan made for this model")
        kept = [self._kept_in_row(module, layer, kwargs, output, keys, values, b, None if real is None else real[b])
                for b in range(keys.shape[0])]
        self.kept_indices[module.layer_idx] = [[k.detach().cpu() for k in row] for row in kept] \
            if len(kept) > 1 else [k.detach().cpu() for k in kept[0]]
        cache.layers[module.layer_idx] = RaggedLayer.from_dense(keys, values, kept)
        return output

    def _kept_in_row(self, module: torch.nn.Module, layer, kwargs: dict, output: list, keys: torch.Tensor,
                     values: torch.Tensor, row: int, real: torch.Tensor | None) -> list[torch.Tensor]:
        """The positions (in the padded batch) each KV head keeps of batch row `row`, whose real tokens are `real`
        (None: all of them): each head's scorer ranks that row alone, as a prefill of the row by itself would."""
        batch, num_kv, length = keys.shape[:3]
        positions = torch.arange(length, device=keys.device) if real is None else real.nonzero().squeeze(-1)
        n = len(positions)
        if n and int(positions[-1] - positions[0]) + 1 == n:  # left or right padding: one span, sliced as views
            span: slice | torch.Tensor = slice(int(positions[0]), int(positions[0]) + n)
        else:
            span = positions
        choices = [(h.policy, h.budget, h.scorer) for h in layer.heads] if layer.heads is not None else \
            [(layer.policy, layer.budget, None)] * num_kv
        hidden = kwargs["hidden_states"]
        alone = batch == 1 and real is None
        if alone:
            row_hidden, row_keys, row_values, row_kwargs = hidden, keys, values, kwargs
        else:
            row_hidden, row_keys = hidden[row:row + 1, span], keys[row:row + 1, :, span]  # views, not copies,
            row_values, row_kwargs = values[row:row + 1, :, span], _row_kwargs(kwargs, row, span)  # when one span
        scores: dict[Any, torch.Tensor] = {}
        kept = []
        for h, (policy, budget, scorer) in enumerate(choices):
            if policy is None or budget is None or budget >= n:
                kept.append(positions)  # this head keeps the row's whole prompt
                continue
            key = scorer if scorer is not None else ("layer", policy)
            if key not in scores:
                press = self._head_presses[scorer][1] if scorer is not None else self._presses[layer.index]
                if alone and output[1] is not None and POLICIES[policy].needs_attentions:
                    scores[key] = rank_scores(policy, press, module, row_hidden, row_keys, row_values, output[1],
                                              row_kwargs)
                else:
                    scores[key], _ = policy_scores(policy, press, module, row_hidden, row_keys, row_values, row_kwargs)
            kept.append(positions[scores[key][0, h].topk(int(budget)).indices])  # (b_h,)
        return kept

    def compress(self, module: torch.nn.Module, hidden_states: torch.Tensor, keys: torch.Tensor,
                 values: torch.Tensor, attentions: torch.Tensor | None, kwargs: dict) -> tuple[torch.Tensor, ...]:
        idx = module.layer_idx
        layer, press = self.plan.layers[idx], self._presses.get(idx)
        if press is None or layer.budget >= keys.shape[2]:
            return keys, values  # untouched layer, or a budget at least the context: keep everything
        if attentions is not None and POLICIES[layer.policy].needs_attentions:
            scores = rank_scores(layer.policy, press, module, hidden_states, keys, values, attentions, kwargs)
        else:
            scores, _ = policy_scores(layer.policy, press, module, hidden_states, keys, values, kwargs)
        indices = scores.topk(int(layer.budget), dim=-1).indices  # (B, H_kv, b), kvpress's own selection rule
        self.kept_indices[idx] = indices.detach().cpu()
        gather = indices.unsqueeze(-1).expand(-1, -1, -1, module.head_dim)  # (B, H_kv, b, D)
        return keys.gather(2, gather).contiguous(), values.gather(2, gather).contiguous()

    @contextmanager
    def __call__(self, model: torch.nn.Module) -> Iterator[None]:
        """Hooks that compress each layer after its prefill. The model's attention is switched to "polykv_sdpa"
        and stays switched after exit (see the module docstring); hooks and rotary attributes are removed."""
        layers = decoder_layers(model)
        if len(layers) != len(self.plan.layers):
            raise PlanError(f"the plan has {len(self.plan.layers)} layers but the model has {len(layers)}; "
                            "use a plan made from a profile of this model")
        self.kept_indices.clear()
        owner = rotary_owner(model)
        types = list(getattr(model.config.get_text_config(), "layer_types", None) or ["full_attention"] * len(layers))
        saved = saved_rotaries(model)  # kvpress sets the shared rotary on every layer and never removes it
        use_polykv_attention(model)  # kept after exit: kvpress's pipeline decodes outside the press context
        try:
            with super().__call__(model):
                for layer, kind in zip(layers, types):  # kvpress set the shared rotary; Gemma-3 needs its layer type
                    layer.self_attn.rotary_emb = rotary_for_layer(owner, kind)
                yield
        finally:
            restore_rotaries(saved)


@dataclass
class _RungPresses:
    """One rung's kvpress presses: per layer for per-layer entries, per scorer for per-head entries."""

    presses: dict[int, BasePress]
    head_presses: dict[str, tuple[str, BasePress]]  # scorer key -> (policy, press)

    @classmethod
    def of(cls, plan: Plan) -> _RungPresses:
        presses = {layer.index: make_press(layer.policy, **layer.params)
                   for layer in plan.layers if layer.policy is not None and layer.budget is not None}
        head_presses = {}
        for layer in plan.layers:
            for head in layer.heads or ():
                if head.policy is not None and head.scorer not in head_presses:
                    head_presses[head.scorer] = (head.policy, make_press(head.policy, **head.params))
        return cls(presses, head_presses)


@contextmanager
def apply_plan(model: torch.nn.Module, plan: Plan | PlanPress | PlanFile, *,
               budget: float | None = None) -> Iterator[PlanPress]:
    """Compress the cache after prefill as `plan` says, for the duration of the block; `model.generate` and manual
    decode loops (pass position_ids, as kvpress's pipeline does) work with the per-layer cache lengths. On exit
    the model is as it was (attention implementation included). A plan file: its rungs at `budget` (default: its
    first), the prompt's length picking among them where it has one per range of prompt lengths.

        with apply_plan(model, plan_file, budget=256):
            out = model.generate(**inputs, max_new_tokens=32)
    """
    if isinstance(plan, PlanFile):
        rungs = plan.rungs_for(budget if budget is not None else plan.budgets[0])
        plan = PlanPress(rungs[0], rungs=tuple(rungs))
    press = plan if isinstance(plan, PlanPress) else PlanPress(plan)
    with polykv_attention(model), press(model):
        yield press


def real_positions(attention_mask: torch.Tensor | None, batch: int, length: int) -> torch.Tensor | None:
    """(B, T) bool: the prompt positions of each row that are real tokens, read from the mask the layer's prefill
    attention saw (a padded position is hidden from the row's last query); None where every position is real."""
    if attention_mask is None or attention_mask.dim() != 4 or attention_mask.shape[-1] < length:
        return None
    last = attention_mask[:, 0, -1, :length]  # (B|1, T): what the last query of each row sees
    visible = last if last.dtype == torch.bool else last == 0
    visible = visible.expand(batch, length)
    return None if bool(visible.all()) else visible


def _row_kwargs(kwargs: dict, row: int, positions: torch.Tensor | slice) -> dict:
    """The attention kwargs a prefill of batch row `row`'s real tokens alone would have seen."""
    sliced = dict(kwargs)
    cos, sin = kwargs["position_embeddings"]
    pick = (lambda t: t[row:row + 1, positions] if t.shape[0] > 1 else t[:, positions])
    sliced["position_embeddings"] = (pick(cos), pick(sin))
    sliced["hidden_states"] = kwargs["hidden_states"][row:row + 1, positions]
    sliced["attention_mask"] = None
    length = sliced["hidden_states"].shape[1]
    sliced["cache_position"] = torch.arange(length, device=kwargs["hidden_states"].device)
    if kwargs.get("position_ids") is not None:
        sliced["position_ids"] = kwargs["position_ids"][row:row + 1, positions] \
            if kwargs["position_ids"].shape[0] > 1 else kwargs["position_ids"][:, positions]
    return sliced

