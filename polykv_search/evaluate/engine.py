"""Shared-prefill evaluation: one full-cache prefill per sample serves every plan to compare.

kvpress compresses a layer's cache in a hook after that layer's prefill attention, so the prefill itself does
not depend on the plan. The engine therefore runs the context once, keeps every layer's keys, values and each
policy's token scores, and applies a plan as a per-layer top-k of those scores (kvpress's own selection rule,
on the same scores): K plans on N samples cost N prefills plus K x N short decodes, not K x N prefills.
Each plan is then answered by greedy decoding (as kvpress's pipeline does) and scored by KL to the full cache
over the reference answer's tokens.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from polykv_search.calibrate.attention import decoder_layers, rotary_for_layer, rotary_owner
from polykv_search.data import PromptParts, Sample, build_prompt
from polykv_search.models import LoadedModel
from polykv_search.policies import check_policy_names, make_press
from polykv_search.policies.scoring import policy_scores
from polykv_search.runtime.attention import polykv_attention


@dataclass(frozen=True)
class Method:
    """One way to build the cache: the full cache (budgets all None) or a per-layer policy and budget."""

    name: str  # e.g. "full", "snapkv", "pyramidkv", "cake", "plan"
    family: str  # "full" | "uniform" | "allocator" | "plan"
    average_budget: int | None
    policies: tuple[str | None, ...]
    budgets: tuple[int | None, ...]

    @property
    def key(self) -> str:
        return self.name if self.average_budget is None else f"{self.name}@{self.average_budget}"


@dataclass
class PrefillState:
    sample: Sample
    parts: PromptParts
    n_context: int
    cache: DynamicCache  # the full cache after the context prefill (never mutated)
    rankings: dict[int, dict[str, torch.Tensor]]  # layer -> policy -> (H_kv, T)
    full_logprobs: torch.Tensor | None = None  # (A, V) full-cache log-probs over the reference answer


@dataclass
class MethodResult:
    sample_id: str
    task: str
    method: str
    answer: str
    kl: float | None
    kept_all_layers: list[int] = field(default_factory=list)  # layers whose budget >= the context length


class EvaluationEngine:
    """Prefill once per sample, then answer any number of methods from that prefill."""

    def __init__(self, lm: LoadedModel, *, policies: Sequence[str], max_context_tokens: int | None = None) -> None:
        self.lm = lm
        self.policies = check_policy_names(list(policies)) if policies else []
        self.presses = {name: make_press(name) for name in self.policies}
        self.layers = decoder_layers(lm.model)
        self.compressible = lm.info.compressible_layers
        self.max_context = max_context_tokens or lm.info.max_context or 8192
        self.prefills = 0  # counted, for the benchmark and the report
        eos = lm.model.generation_config.eos_token_id
        self.stop_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])

    # -- one prefill per sample ------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, sample: Sample) -> PrefillState:
        parts = build_prompt(sample, self.lm.tokenizer, max_context_tokens=self.max_context)
        context = torch.tensor([parts.context_ids], device=self.lm.device)  # (1, T)
        rankings: dict[int, dict[str, torch.Tensor]] = {}
        owner = rotary_owner(self.lm.model)

        def hook(module, args, kwargs, output):
            idx = module.layer_idx
            layer = kwargs["past_key_values"].layers[idx]
            rankings[idx] = {}
            for name, press in self.presses.items():
                scores, _ = policy_scores(name, press, module, kwargs["hidden_states"], layer.keys, layer.values,
                                          kwargs)
                rankings[idx][name] = scores[0].float()  # (H_kv, T)
            return output

        handles = []
        try:
            for idx in self.compressible:
                attn = self.layers[idx].self_attn
                attn.rotary_emb = rotary_for_layer(owner, self.lm.info.layer_types[idx])
                handles.append(attn.register_forward_hook(hook, with_kwargs=True))
            cache = DynamicCache(config=self.lm.model.config)
            for press in self.presses.values():
                press.post_init_from_model(self.lm.model)
            self.lm.model.model(input_ids=context, past_key_values=cache, use_cache=True)  # no logits needed
        finally:
            for handle in handles:
                handle.remove()
        self.prefills += 1
        state = PrefillState(sample=sample, parts=parts, n_context=context.shape[1], cache=cache, rankings=rankings)
        state.full_logprobs = self._answer_logprobs(state, self._cache_for(state, None)[0])
        return state

    # -- per method ------------------------------------------------------------------------------
    def full_method(self) -> Method:
        n = self.lm.info.num_layers
        return Method("full", "full", None, (None,) * n, (None,) * n)

    @torch.inference_mode()
    def run(self, state: PrefillState, method: Method, *, with_kl: bool = True) -> MethodResult:
        cache, kept_all = self._cache_for(state, method)
        answer = self._greedy(state, cache)
        kl = None
        if with_kl and state.full_logprobs is not None and state.parts.answer_ids:
            logprobs = self._answer_logprobs(state, self._cache_for(state, method)[0])
            kl = float((state.full_logprobs.exp() * (state.full_logprobs - logprobs)).sum(-1).mean())
        return MethodResult(sample_id=str(state.sample.id), task=state.sample.task, method=method.key,
                            answer=answer, kl=kl, kept_all_layers=kept_all)

    def kept_indices(self, state: PrefillState, method: Method) -> dict[int, torch.Tensor]:
        """Per compressed layer, the (H_kv, b) context positions the method keeps, in kvpress's top-k order."""
        kept = {}
        for idx in self.compressible:
            policy, budget = method.policies[idx], method.budgets[idx]
            if policy is not None and budget is not None and budget < state.n_context:
                kept[idx] = state.rankings[idx][policy].topk(int(budget), dim=-1).indices
        return kept

    def _cache_for(self, state: PrefillState, method: Method | None) -> tuple[DynamicCache, list[int]]:
        """A new cache holding, per layer, the kept context entries (shares unchanged tensors, never mutates)."""
        cache = copy.copy(state.cache)
        cache.layers = [copy.copy(layer) for layer in state.cache.layers]
        kept_all: list[int] = []
        if method is None:
            return cache, kept_all
        kept = self.kept_indices(state, method)
        for idx in self.compressible:
            module = self.layers[idx].self_attn
            if idx not in kept:
                module.polykv_compressed = False
                if method.budgets[idx] is not None and method.budgets[idx] >= state.n_context:
                    kept_all.append(idx)
                continue
            layer = cache.layers[idx]
            index = kept[idx][None, :, :, None].expand(-1, -1, -1, layer.keys.shape[-1])  # (1, H_kv, b, D)
            layer.keys = layer.keys.gather(2, index.to(layer.keys.device))
            layer.values = layer.values.gather(2, index.to(layer.values.device))
            module.polykv_compressed = True
        return cache, kept_all

    def _greedy(self, state: PrefillState, cache: DynamicCache) -> str:
        """kvpress's generate_answer: question forward at the true positions, then token by token."""
        model, device = self.lm.model, self.lm.device
        n, question = state.n_context, state.parts.question_ids
        position_ids = torch.arange(n, n + len(question), device=device)[None]  # (1, q)
        with polykv_attention(model):
            out = model(input_ids=torch.tensor([question], device=device), past_key_values=cache,
                        position_ids=position_ids, logits_to_keep=1)
            generated = [int(out.logits[0, -1].argmax())]
            position = position_ids[:, -1:] + 1
            for step in range(state.parts.max_new_tokens - 1):
                if generated[-1] in self.stop_ids:
                    break
                out = model(input_ids=torch.tensor([[generated[-1]]], device=device), past_key_values=cache,
                            position_ids=position + step)
                generated.append(int(out.logits[0, -1].argmax()))
        return str(self.lm.tokenizer.decode(generated, skip_special_tokens=True))

    def _answer_logprobs(self, state: PrefillState, cache: DynamicCache) -> torch.Tensor | None:
        """Log-probs (A, V) the model gives each reference answer token, teacher-forced after the question."""
        answer = list(state.parts.answer_ids)
        if not answer:
            return None
        suffix = list(state.parts.question_ids) + answer
        n = state.n_context
        position_ids = torch.arange(n, n + len(suffix), device=self.lm.device)[None]
        with polykv_attention(self.lm.model):
            out = self.lm.model(input_ids=torch.tensor([suffix], device=self.lm.device), past_key_values=cache,
                                position_ids=position_ids, logits_to_keep=len(answer) + 1)
        logits = out.logits[0, :-1].float()  # (A, V): position i predicts answer token i
        return torch.log_softmax(logits, dim=-1)
