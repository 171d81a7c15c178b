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
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from polykv_search.calibrate.attention import (
    decoder_layers,
    rotary_for_layer,
    rotary_owner,
)
from polykv_search.data import PromptParts, Sample, build_prompt
from polykv_search.evaluate.metrics import scored_part_complete
from polykv_search.models import LoadedModel
from polykv_search.policies import POLICIES, check_policy_names, make_press
from polykv_search.policies.projections import keeping_query_projections
from polykv_search.policies.scoring import score_policies
from polykv_search.runtime.attention import (
    observing_prefill,
    polykv_attention,
    take_observed,
)
from polykv_search.runtime.reserved import ReservedLayer


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
    # per decoder layer, the (1, S, D) hidden states entering it in that full-cache teacher-forced pass
    suffix_inputs: list[torch.Tensor] | None = None


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

    def __init__(self, lm: LoadedModel, *, policies: Sequence[str] = (),
                 variants: dict[str, tuple[str, dict]] | None = None, max_context_tokens: int | None = None) -> None:
        """`policies`: registered names with their registered parameters; `variants`: key -> (name, params)
        for a policy with other parameters (a Method then names the key instead of the policy)."""
        self.lm = lm
        self.policies = check_policy_names(list(policies)) if policies else []
        self.presses = {name: make_press(name) for name in self.policies}
        for key, (name, params) in (variants or {}).items():
            check_policy_names([name])
            self.presses[key] = make_press(name, **params)
        self.layers = decoder_layers(lm.model)
        self.compressible = lm.info.compressible_layers
        self._names = {key: name for key, (name, _) in (variants or {}).items()}
        self.max_context = max_context_tokens or lm.info.max_context or 8192
        self.prefills = 0  # counted, for the benchmark and the report
        self._observe = any(POLICIES[self._names.get(key, key)].needs_attentions for key in self.presses)
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
            scores, _ = score_policies(self.presses, module, kwargs["hidden_states"], layer.keys, layer.values,
                                       kwargs, names=self._names, observed=take_observed(module))
            rankings[idx] = {key: score[0].float() for key, score in scores.items()}  # (H_kv, T) each
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
            attentions = [self.layers[idx].self_attn for idx in self.compressible]
            modules = attentions if self._observe else []
            with (keeping_query_projections(attentions),  # scorers reuse the prefill's q_proj
                  observing_prefill(self.lm.model, modules, last=1) if modules else nullcontext()):
                self.lm.model.model(input_ids=context, past_key_values=cache, use_cache=True)  # no logits needed
        finally:
            for handle in handles:
                handle.remove()
        self.prefills += 1
        return self.state_from(sample, parts, cache, rankings)

    @torch.inference_mode()
    def state_from(self, sample: Sample, parts: PromptParts, cache: DynamicCache,
                   rankings: dict[int, dict[str, torch.Tensor]]) -> PrefillState:
        """The state of a context prefill run elsewhere (calibrate's): its cache, never modified here, and its
        rankings (H_kv, T) per layer and policy; adds the full cache's log-probs over the reference answer."""
        state = PrefillState(sample=sample, parts=parts, n_context=len(parts.context_ids), cache=cache,
                             rankings=rankings)
        if not parts.answer_ids:
            return state
        with self._recording_inputs() as inputs:
            state.full_logprobs = self._answer_logprobs(state, self._cache_for(state, None)[0])
        state.suffix_inputs = inputs or None
        return state

    @contextmanager
    def _recording_inputs(self):
        """Collects, per decoder layer, the hidden states entering it during one forward (batch 1); yields a list
        that is filled once the forward ran every layer (left empty otherwise)."""
        seen: dict[int, torch.Tensor] = {}

        def recorder(index: int):
            def record(module, args, kwargs):
                seen[index] = args[0] if args else kwargs["hidden_states"]
            return record

        handles = [layer.register_forward_pre_hook(recorder(i), with_kwargs=True) for i, layer in enumerate(self.layers)]
        found: list[torch.Tensor] = []
        try:
            yield found
        finally:
            for handle in handles:
                handle.remove()
        if len(seen) == len(self.layers):
            found.extend(seen[i] for i in range(len(self.layers)))

    @torch.inference_mode()
    def layer_inputs(self, state: PrefillState, method: Method) -> list[torch.Tensor] | None:
        """Per decoder layer, the (1, S, D) hidden states entering it when the question and reference answer run
        teacher-forced on `method`'s cache (None without a reference answer or when the model's layers cannot be
        entered one at a time)."""
        if not state.parts.answer_ids:
            return None
        cache, valid, _ = self._batched_cache(state, [method])
        with self._recording_inputs() as inputs:
            self._suffix_logits(state, cache, valid)
        return inputs or None

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

    @torch.inference_mode()
    def run_many(self, state: PrefillState, methods: Sequence[Method], *, with_kl: bool = True,
                 batch_size: int = 16) -> list[MethodResult]:
        """Answer several methods at once: one batch row per method, each layer's cache padded to the longest
        row and the padding masked out. Same selection as `run`; only the batching differs."""
        results: list[MethodResult] = []
        for start in range(0, len(methods), batch_size):
            group = list(methods[start:start + batch_size])
            cache, valid, kept_all = self._batched_cache(state, group)
            kls: list[float | None] = [None] * len(group)
            first_logits = None
            if with_kl and state.full_logprobs is not None and state.parts.answer_ids:
                logits = self._suffix_logits(state, cache, valid)  # (B, A + 1, V)
                logprobs = torch.log_softmax(logits[:, :-1], dim=-1)  # (B, A, V)
                full = state.full_logprobs[None]  # (1, A, V)
                kls = (full.exp() * (full - logprobs)).sum(-1).mean(-1).tolist()
                if self._rewindable(cache):  # the question's forward is in the teacher-forced one: reuse it
                    for layer in cache.layers:
                        layer.crop(-len(state.parts.answer_ids))
                    first_logits = logits[:, 0]
                else:
                    cache, valid, _ = self._batched_cache(state, group)
            answers = self._greedy_batch(state, cache, valid, first_logits=first_logits)
            for row, method in enumerate(group):
                results.append(MethodResult(sample_id=str(state.sample.id), task=state.sample.task,
                                            method=method.key, answer=answers[row], kl=kls[row],
                                            kept_all_layers=kept_all[row]))
        return results

    @torch.inference_mode()
    def kl_many(self, state: PrefillState, methods: Sequence[Method], *, batch_size: int = 16) -> list[float]:
        """KL(full || method) over the reference answer for each method: one teacher-forced forward per batch,
        no decoding."""
        return [m["kl"] for m in self.answer_metrics_many(state, methods, batch_size=batch_size)]

    @torch.inference_mode()
    def answer_metrics_many(self, state: PrefillState, methods: Sequence[Method], *, batch_size: int = 16,
                            reference: Method | None = None) -> list[dict[str, float]]:
        """Teacher-forced measures over the reference answer, per method (the optimizer's end-to-end objectives):
        "kl" = mean KL(full || method), "nll" = mean negative log-likelihood of the reference tokens,
        "miss" = share of reference tokens that are not the method's top-1 prediction (what greedy decoding
        would get wrong given a correct prefix), "lost" = 1 - exp(-kl), the share of the full cache's output
        distribution lost (at most 1 per sample). One forward per batch, no decoding.

        `reference`: a method the rows differ from in few layers (calibrate --around's background). Its hidden
        states are recorded in one extra pass and each row's forward starts at the first layer where its cache
        differs from the reference's (the same numbers; the layers below are skipped)."""
        if state.full_logprobs is None:
            return [{"kl": 0.0, "nll": 0.0, "miss": 0.0, "lost": 0.0} for _ in methods]
        answer = torch.tensor(state.parts.answer_ids, device=state.full_logprobs.device)  # (A,)
        full = state.full_logprobs[None]  # (1, A, V)
        # rows are batched by their first compressed layer: below it every row is the full cache, whose hidden
        # states were kept, so the forward starts there (on average half the layers for one-layer probes)
        inputs = state.suffix_inputs if reference is None else self.layer_inputs(state, reference)
        first = [0 if inputs is None else self._first_compressed(state, m) if reference is None
                 else self._first_difference(state, m, reference) for m in methods]
        order = sorted(range(len(methods)), key=lambda i: first[i])
        out: list[dict[str, float]] = [{} for _ in methods]
        for begin in range(0, len(order), batch_size):
            rows = order[begin:begin + batch_size]
            group = [methods[i] for i in rows]
            cache, valid, _ = self._batched_cache(state, group)
            logits = self._suffix_logits(state, cache, valid, start=min(first[i] for i in rows), inputs=inputs)
            logprobs = torch.log_softmax(logits[:, :-1], dim=-1)  # (B, A, V)
            kl = (full.exp() * (full - logprobs)).sum(-1).mean(-1)  # (B,)
            nll = -logprobs.gather(-1, answer[None, :, None].expand(len(group), -1, 1))[..., 0].mean(-1)  # (B,)
            miss = (logprobs.argmax(-1) != answer[None]).float().mean(-1)  # (B,)
            for i, k, n, m in zip(rows, kl, nll, miss):
                out[i] = {"kl": float(k), "nll": float(n), "miss": float(m), "lost": float(-torch.expm1(-k))}
        return out

    def _first_compressed(self, state: PrefillState, method: Method) -> int:
        """The first layer whose cache the method changes (the layer count when it changes none); 0 when the
        full cache's hidden states were not kept, so a forward must start at the embeddings."""
        if state.suffix_inputs is None:
            return 0
        return min(self._compressed_layers(state, method), default=len(self.layers))

    def _first_difference(self, state: PrefillState, method: Method, reference: Method) -> int:
        """The first layer whose cache differs between `method` and `reference` (the layer count if none)."""
        return next((idx for idx in self.compressible
                     if _selection(state, method, idx) != _selection(state, reference, idx)), len(self.layers))

    def _compressed_layers(self, state: PrefillState, method: Method) -> list[int]:
        """The compressible layers where the method keeps fewer tokens than the context."""
        return [idx for idx in self.compressible if _selection(state, method, idx) is not None]

    def kept_indices(self, state: PrefillState, method: Method) -> dict[int, torch.Tensor]:
        """Per compressed layer, the (H_kv, b) context positions the method keeps, in kvpress's top-k order."""
        return {idx: state.rankings[idx][method.policies[idx]].topk(int(method.budgets[idx]), dim=-1).indices
                for idx in self._compressed_layers(state, method)}

    def _cache_for(self, state: PrefillState, method: Method | None) -> tuple[DynamicCache, list[int]]:
        """A new cache holding, per layer, the kept context entries (shares unchanged tensors, never mutates)."""
        cache = copy.copy(state.cache)
        room = self._room(state)
        cache.layers = [_reserved(layer, layer.keys, layer.values, room) for layer in state.cache.layers]
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
            layer = state.cache.layers[idx]
            index = kept[idx][None, :, :, None].expand(-1, -1, -1, layer.keys.shape[-1])  # (1, H_kv, b, D)
            cache.layers[idx] = _reserved(layer, layer.keys.gather(2, index.to(layer.keys.device)),
                                          layer.values.gather(2, index.to(layer.values.device)), room)
            module.polykv_compressed = True
        return cache, kept_all

    @staticmethod
    def _room(state: PrefillState) -> int:
        """Cache slots a method's cache needs after the context: the question, then the answer or the decoding."""
        return len(state.parts.question_ids) + max(len(state.parts.answer_ids), state.parts.max_new_tokens) + 1

    def _batched_cache(self, state: PrefillState, methods: list[Method]):
        """A batch-B cache (one row per method) and per-layer validity masks (B, K_l) of the padded slots."""
        batch, n = len(methods), state.n_context
        cache = copy.copy(state.cache)
        cache.layers = []
        valid: dict[int, torch.Tensor] = {}
        kept_all: list[list[int]] = [[] for _ in methods]
        kept = [self.kept_indices(state, m) for m in methods]
        room = self._room(state)
        for idx, layer in enumerate(state.cache.layers):
            keys, values = layer.keys, layer.values  # (1, H_kv, T', D)
            if idx not in self.compressible or not any(idx in k for k in kept):
                for row, method in enumerate(methods):
                    if idx in self.compressible and method.budgets[idx] is not None and method.budgets[idx] >= n:
                        kept_all[row].append(idx)
                # expanded views: a sliding layer's update() concatenates them into a new tensor
                cache.layers.append(_reserved(layer, keys.expand(batch, -1, -1, -1),
                                              values.expand(batch, -1, -1, -1), room))
                continue
            num_kv = keys.shape[1]
            lengths = [k[idx].shape[-1] if idx in k else n for k in kept]
            longest = max(lengths)
            index = torch.zeros(batch, num_kv, longest, dtype=torch.long)  # (B, H_kv, K_l), pad -> position 0
            mask = torch.zeros(batch, longest, dtype=torch.bool)  # (B, K_l)
            for row, k in enumerate(kept):
                if idx in k:
                    index[row, :, :lengths[row]] = k[idx]
                else:
                    index[row, :, :n] = torch.arange(n)
                    if methods[row].budgets[idx] is not None:
                        kept_all[row].append(idx)
                mask[row, :lengths[row]] = True
            gather = index[..., None].expand(-1, -1, -1, keys.shape[-1]).to(keys.device)  # (B, H_kv, K_l, D)
            cache.layers.append(_reserved(layer, keys.expand(batch, -1, -1, -1).gather(2, gather),
                                          values.expand(batch, -1, -1, -1).gather(2, gather), room))
            valid[idx] = mask.to(keys.device)
        return cache, valid, kept_all

    def _set_valid(self, valid: dict[int, torch.Tensor] | None) -> None:
        for idx in self.compressible:
            self.layers[idx].self_attn.polykv_valid = None if valid is None else valid.get(idx)

    def _greedy_batch(self, state: PrefillState, cache: DynamicCache, valid: dict[int, torch.Tensor],
                      first_logits: torch.Tensor | None = None) -> list[str]:
        """Greedy answers, one per batch row. `first_logits` (B, V): the question is already in `cache` and these
        are its last position's logits (from a teacher-forced pass rewound to the question)."""
        model, device = self.lm.model, self.lm.device
        batch = cache.layers[0].keys.shape[0]
        n, question = state.n_context, state.parts.question_ids
        position_ids = torch.arange(n, n + len(question), device=device)[None].expand(batch, -1)  # (B, q)
        generated = torch.zeros(batch, 0, dtype=torch.long)
        finished = torch.zeros(batch, dtype=torch.bool)
        stop = torch.tensor(sorted(self.stop_ids), dtype=torch.long)
        self._set_valid(valid)
        try:
            with polykv_attention(model):
                if first_logits is None:
                    logits = model(input_ids=torch.tensor([question] * batch, device=device), past_key_values=cache,
                                   position_ids=position_ids, logits_to_keep=1).logits[:, -1]
                else:
                    logits = first_logits
                position = position_ids[:, -1:] + 1
                for step in range(state.parts.max_new_tokens):
                    token = logits.argmax(-1).cpu()  # (B,)
                    generated = torch.cat([generated, token[:, None]], dim=1)
                    finished |= torch.isin(token, stop)
                    for row in (~finished).nonzero()[:, 0].tolist():
                        finished[row] = self._scored_part_done(state, generated[row].tolist())
                    if step == state.parts.max_new_tokens - 1 or bool(finished.all()):
                        break
                    logits = model(input_ids=token[:, None].to(device), past_key_values=cache,
                                   position_ids=position + step).logits[:, -1]
        finally:
            self._set_valid(None)
        answers = []
        for row in generated.tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in self.stop_ids), len(row))
            answers.append(str(self.lm.tokenizer.decode(row[:cut], skip_special_tokens=True)))
        return answers

    def _scored_part_done(self, state: PrefillState, tokens: list[int]) -> bool:
        """Whether the answer so far already holds everything its task's metric reads (the first line of a one-line
        answer): decoding further would not change the score, only the time."""
        return scored_part_complete(state.sample.task, self.lm.tokenizer.decode(tokens, skip_special_tokens=True))

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
                if generated[-1] in self.stop_ids or self._scored_part_done(state, generated):
                    break
                out = model(input_ids=torch.tensor([[generated[-1]]], device=device), past_key_values=cache,
                            position_ids=position + step)
                generated.append(int(out.logits[0, -1].argmax()))
        return str(self.lm.tokenizer.decode(generated, skip_special_tokens=True))

    def _answer_logprobs(self, state: PrefillState, cache: DynamicCache,
                         valid: dict[int, torch.Tensor] | None = None) -> torch.Tensor | None:
        """Log-probs the model gives each reference answer token, teacher-forced after the question:
        (A, V) for a single cache, (B, A, V) for a batched one."""
        if not state.parts.answer_ids:
            return None
        logits = self._suffix_logits(state, cache, valid)[:, :-1]  # (B, A, V): position i predicts answer token i
        logprobs = torch.log_softmax(logits, dim=-1)
        return logprobs[0] if valid is None and logits.shape[0] == 1 else logprobs

    @staticmethod
    def _rewindable(cache: DynamicCache) -> bool:
        """Whether every layer can drop its newest entries exactly (full attention: a sliding window has already
        pushed its oldest entries out)."""
        return all(type(layer) in (DynamicLayer, ReservedLayer) for layer in cache.layers)

    def _suffix_logits(self, state: PrefillState, cache: DynamicCache,
                       valid: dict[int, torch.Tensor] | None = None, start: int = 0,
                       inputs: list[torch.Tensor] | None = None) -> torch.Tensor:
        """(B, A + 1, V) float logits of the question's last position and of every answer token, with the question
        and reference answer teacher-forced into `cache`.

        `start` > 0: every row holds the full cache below layer `start`, so the forward begins at that layer from
        the full-cache pass's hidden states (`state.suffix_inputs`); layers below it are neither run nor written,
        so the cache then serves this call only. `inputs`: per-layer hidden states of another pass whose cache
        every row shares below `start` (default: the full cache's)."""
        answer = list(state.parts.answer_ids)
        suffix = list(state.parts.question_ids) + answer
        batch = cache.layers[0].keys.shape[0]
        n = state.n_context
        position_ids = torch.arange(n, n + len(suffix), device=self.lm.device)[None].expand(batch, -1)
        inner, model = self.lm.model.model, self.lm.model
        inputs_at = inputs if inputs is not None else state.suffix_inputs
        if inputs_at is None or getattr(inner, "layers", None) is not self.layers \
                or start >= len(self.layers):  # a multimodal wrapper, or rows that change no layer: run them all
            start = 0
        feed = {"input_ids": torch.tensor([suffix] * batch, device=self.lm.device)}
        if start > 0:
            feed = {"inputs_embeds": inputs_at[start].expand(batch, -1, -1)}
            inner.layers = torch.nn.ModuleList(list(self.layers)[start:])  # each keeps its own layer_idx
        self._set_valid(valid)
        try:
            with polykv_attention(model):
                out = model(**feed, past_key_values=cache, position_ids=position_ids,
                            logits_to_keep=len(answer) + 1)
        finally:
            self._set_valid(None)
            inner.layers = self.layers
        return out.logits.float()


def _selection(state: PrefillState, method: Method, idx: int) -> tuple[str, int] | None:
    """What the method keeps in layer `idx`: (policy, budget), or None when it keeps the whole context."""
    policy, budget = method.policies[idx], method.budgets[idx]
    if policy is None or budget is None or budget >= state.n_context:
        return None
    return policy, int(budget)


def _reserved(layer, keys: torch.Tensor, values: torch.Tensor, room: int):
    """A layer for one method's decoding: full-attention layers get a ReservedLayer (decoding writes in place);
    other layer kinds (sliding windows) a shallow copy holding `keys`/`values`. The prefill's layer is untouched."""
    if type(layer) is DynamicLayer:
        return ReservedLayer(keys, values, room)
    new = copy.copy(layer)
    new.keys, new.values = keys, values
    return new
