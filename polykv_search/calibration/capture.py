"""Forward hooks that turn one prefill and one teacher-forced decoding pass into per-layer rankings,
signals and cost curves, without keeping any (layers x T x T) attention.

Phase "prefill": after each layer's attention over the context, every policy's kvpress scorer ranks the
context tokens (H2O's observed attention is accumulated over query chunks), and the observation window's
attention is reduced to CAKE's signals. Phase "decode": the question and reference answer run on the full
cache; their attention over the context gives the shift signal and each policy's cost at every budget.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch

from polykv_search.models.anatomy import decoder_layers, layer_rotaries
from polykv_search.policies.attention import attention_probs
from polykv_search.calibration.costs import cost_curves
from polykv_search.calibration.head_fisher import fisher_from_dot
from polykv_search.calibration.signals import (
    SIGNAL_NAMES,
    decoding_signals,
    group_heads,
    window_signals,
)
from polykv_search.models import ModelInfo
from polykv_search.policies import POLICIES
from polykv_search.policies.presses import make_press
from polykv_search.policies.projections import keeping_query_projections
from polykv_search.policies.scoring import CHUNK_ELEMENTS, score_policies
from polykv_search.runtime.attention import observing_prefill, take_observed


@dataclass
class SampleRecord:
    """What one sample contributes: per layer (L, H_kv) signals and (L, H_kv, P, G) costs."""

    mass_lost: torch.Tensor
    out_err: torch.Tensor
    signals: dict[str, torch.Tensor]
    layer_probes: dict[str, torch.Tensor] | None = None  # `--layer-kl` only: layer_kl, layer_nll (L, 1, P, G)
    head_fisher: torch.Tensor | None = None  # `--head-fisher` only: (L, H_kv, P, G)


@dataclass
class _LayerState:
    rankings: dict[str, torch.Tensor] = field(default_factory=dict)  # policy -> (H_kv, T)
    window_mean: torch.Tensor | None = None  # (H, T)


class LayerCapture:
    """Hooks on every attention module; `phase` selects what a forward computes."""

    def __init__(self, model: torch.nn.Module, info: ModelInfo, *, policies: Sequence[str],
                 budgets: Sequence[int], window: int = 64, n_sink: int = 4, recent: int = 64,
                 ) -> None:
        self.model, self.info = model, info
        self.policies, self.budgets = list(policies), [int(b) for b in budgets]
        self.window, self.n_sink, self.recent = window, n_sink, recent
        self.presses = {name: make_press(name) for name in self.policies}
        self.chunk_elements = CHUNK_ELEMENTS
        self.layer_ids = info.compressible_layers
        self.phase: str | None = None
        self.n_context = 0
        self._state: dict[int, _LayerState] = {}
        self._record: SampleRecord | None = None
        self.answer_grads: dict[int, torch.Tensor] = {}  # set per sample for the Fisher estimate: layer -> (K, H, S, D)
        self.n_answer = 0

    @contextmanager
    def attached(self) -> Iterator[LayerCapture]:
        """The hooks, for the duration of the block; on exit the model is as it was."""
        layers = decoder_layers(self.model)
        for press in self.presses.values():
            press.post_init_from_model(self.model)
        hooks = []
        modules = [layers[idx].self_attn for idx in self.layer_ids]
        observe = any(POLICIES[name].needs_attentions for name in self.policies)
        try:
            for attn in modules:
                hooks.append(attn.register_forward_hook(self._hook, with_kwargs=True))
            with (layer_rotaries(self.model, self.layer_ids),  # ExpectedAttention reads `rotary_emb`
                  keeping_query_projections(modules),  # scorers reuse the prefill's q_proj
                  observing_prefill(self.model, modules, last=self.window) if observe else nullcontext()):
                yield self  # with H2O, its column sums come out of the model's own attention pass
        finally:
            for hook in hooks:
                hook.remove()
            self.phase = None

    def start_sample(self, n_context: int) -> None:
        num_layers, num_kv = self.info.num_layers, self.info.num_kv_heads
        shape = (num_layers, num_kv, len(self.policies), len(self.budgets))
        nan = float("nan")
        self.n_context = n_context
        self.answer_grads, self.n_answer = {}, 0
        self._state = {idx: _LayerState() for idx in self.layer_ids}
        self._record = SampleRecord(
            mass_lost=torch.full(shape, nan), out_err=torch.full(shape, nan),
            signals={name: torch.full((num_layers, num_kv), nan) for name in SIGNAL_NAMES})

    def rankings(self) -> dict[int, dict[str, torch.Tensor]]:
        """The current sample's prefill rankings: layer -> policy -> (H_kv, T) scores, higher kept first."""
        return {idx: dict(state.rankings) for idx, state in self._state.items()}

    def finish_sample(self) -> SampleRecord:
        record, self._record, self._state = self._record, None, {}
        self.answer_grads = {}
        assert record is not None
        return record

    # -- hooks -------------------------------------------------------------------------------------
    @torch.no_grad()
    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict, output: tuple) -> tuple:
        if self.phase == "prefill":
            self._on_prefill(module, kwargs)
        elif self.phase == "decode":
            self._on_decode(module, kwargs)
        return output

    def _on_prefill(self, module: torch.nn.Module, kwargs: dict) -> None:
        idx = module.layer_idx
        hidden = kwargs["hidden_states"]  # (1, T, d)
        layer = kwargs["past_key_values"].layers[idx]
        keys, values = layer.keys, layer.values  # (1, H_kv, T, D)
        cos, sin = kwargs["position_embeddings"]
        n = keys.shape[2]
        state = self._state[idx]
        scores, observed = score_policies(self.presses, module, hidden, keys, values, kwargs,
                                          observed=take_observed(module), min_chunk=self.window,
                                          chunk_elements=self.chunk_elements)
        for name, ranking in scores.items():
            state.rankings[name] = ranking[0].cpu()  # (H_kv, T)
        w = min(self.window, n)
        if observed is not None and observed.shape[1] >= w:
            win = observed[:, -w:]  # the last chunk's final queries are the observation window
        else:
            win = attention_probs(module, hidden[:, -w:], keys, (cos[:, -w:], sin[:, -w:]), first_position=n - w)
        sig = window_signals(win, n)  # each (H,)
        state.window_mean = (win / win.sum(-1, keepdim=True)).mean(dim=1).cpu()  # (H, T)
        for key, value in sig.items():
            self._record.signals[key][idx] = group_heads(value, self.info.num_kv_heads).cpu()

    def _on_decode(self, module: torch.nn.Module, kwargs: dict) -> None:
        idx = module.layer_idx
        hidden = kwargs["hidden_states"]  # (1, S, d)
        layer = kwargs["past_key_values"].layers[idx]
        keys, values = layer.keys, layer.values  # (1, H_kv, T + S, D)
        n_ctx = self.n_context
        probs = attention_probs(module, hidden, keys, kwargs["position_embeddings"], first_position=n_ctx)
        probs = probs.cpu()  # (H, S, T + S)
        state = self._state[idx]
        sig = decoding_signals(probs, state.window_mean, n_ctx, n_sink=self.n_sink, recent=self.recent)
        for key, value in sig.items():
            self._record.signals[key][idx] = group_heads(value, self.info.num_kv_heads)
        vals = values[0].cpu()  # (H_kv, T + S, D)
        rankings = torch.stack([state.rankings[name] for name in self.policies])  # (P, H_kv, T)
        grads = self.answer_grads.pop(idx, None)
        lost, err, *dots = cost_curves(probs, vals, rankings, self.budgets, n_ctx, grads)  # (P, H_kv, G) each
        self._record.mass_lost[idx] = lost.transpose(0, 1)  # (H_kv, P, G)
        self._record.out_err[idx] = err.transpose(0, 1)
        if dots:  # (P, K, H_kv, G) -> (H_kv, P, G)
            if self._record.head_fisher is None:
                self._record.head_fisher = torch.full_like(self._record.mass_lost, float("nan"))
            self._record.head_fisher[idx] = fisher_from_dot(dots[0], self.n_answer).transpose(0, 1)
