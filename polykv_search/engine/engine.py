"""The shared-prefill engine: one full-cache prefill per sample serves every plan to compare or probe.

kvpress compresses a layer's cache in a hook after that layer's prefill attention, so the prefill itself does
not depend on the plan. The engine therefore runs the context once, keeps every layer's keys, values and each
policy's token scores, and applies a plan as a top-k of those scores per layer and KV head (kvpress's own
selection rule, on the same scores): K plans on N samples cost N prefills plus K x N short decodes, not K x N
prefills. A plan is answered by greedy decoding (as kvpress's pipeline does) and measured teacher-forced over the
reference answer (KL to the full cache, NLL, misses). calibrate's probes, optimize's end-to-end objective and
evaluate's comparison all run here.

    engine = PrefillEngine.for_plans(lm, plans)
    state = engine.prefill(sample)
    answers = engine.run_many(state, plans)           # greedy answers and KL, one batch row per plan
    metrics = engine.answer_metrics_many(state, plans)  # teacher-forced only, no decoding
    windowed = engine.run_windowed(state, plans)      # TensorRT-LLM's computation: a prefill per plan
    probes = engine.window_metrics(state, [(layer, window)])  # one layer windowed so, teacher-forced

A per-layer window plan (a `trtllm` target's) can also be answered as TensorRT-LLM computes it: each layer attends
through a sliding window of its budget in the prefill itself and in every later step, with no sinks
(`run_windowed`). That prefill depends on the plan, so it costs one prefill per plan and sample.

A plan's layer may keep one policy and budget for all its KV heads or one per head (`LayerPlan.heads`): rows of
different lengths are padded and the padding hidden per KV head.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from polykv_search.data import PromptParts, Sample, build_prompt
from polykv_search.data.metrics import scored_part_complete
from polykv_search.errors import ConfigError
from polykv_search.models import LoadedModel
from polykv_search.models.anatomy import decoder_layers, layer_rotaries, logit_softcap
from polykv_search.plan import Plan
from polykv_search.policies import POLICIES, check_policy_names, policy_params, scorer_key
from polykv_search.policies.presses import make_press
from polykv_search.policies.projections import keeping_query_projections
from polykv_search.policies.scoring import score_policies
from polykv_search.runtime.attention import (
    attention_windows,
    observing_prefill,
    polykv_attention,
    take_observed,
    validity_masks,
)
from polykv_search.runtime.reserved import ReservedLayer
from polykv_search.runtime.shared import SharedContextLayer

HeadChoices = list[tuple[str, int] | None]  # per KV head: (scorer, budget), or None to keep the whole context


@dataclass
class PrefillState:
    """One sample after its context prefill: the full cache, the rankings, and the full cache's answer log-probs."""

    sample: Sample
    parts: PromptParts
    n_context: int
    cache: DynamicCache  # the full cache after the context prefill (never mutated)
    rankings: dict[int, dict[str, torch.Tensor]]  # layer -> scorer key -> (H_kv, T)
    full_logprobs: torch.Tensor | None = None  # (A, V) full-cache log-probs over the reference answer
    # per decoder layer, the (1, S, D) hidden states entering it in that full-cache teacher-forced pass
    suffix_inputs: list[torch.Tensor] | None = None


@dataclass
class Answer:
    """A plan's greedy answer to one sample, its KL to the full cache over the reference answer, and the layers
    whose budget kept the whole context."""

    sample_id: str
    task: str
    answer: str
    kl: float | None
    kept_all_layers: list[int] = field(default_factory=list)


class PrefillEngine:
    """Prefill once per sample, then answer or measure any number of plans from that prefill."""

    def __init__(self, lm: LoadedModel, *, scorers: Iterable[str | tuple[str, dict]] = (),
                 max_context_tokens: int | None = None, question_aware: bool = False) -> None:
        """`scorers`: the rankings the prefill computes, each a registered policy name (its registered parameters)
        or (policy, params); a plan may only use rankings the engine scored (`for_plans` collects them).
        `question_aware`: the question is prefilled and compressed with the context (kvpress's second setting)."""
        self.lm = lm
        self.question_aware = question_aware
        self.presses: dict[str, object] = {}
        self._names: dict[str, str] = {}  # scorer key -> policy, for keys with other parameters
        for scorer in scorers:
            name, params = (scorer, None) if isinstance(scorer, str) else scorer
            check_policy_names([name])
            key = scorer_key(name, params)
            if key not in self.presses:
                self.presses[key] = make_press(name, **(params or {}))
                if key != name:
                    self._names[key] = name
        self.layers = decoder_layers(lm.model)
        self.compressible = lm.info.compressible_layers
        self.max_context = max_context_tokens or lm.info.max_context or 8192
        self.prefills = 0  # counted, for the benchmark and the report
        self._observe = any(POLICIES[self._names.get(key, key)].needs_attentions for key in self.presses)
        eos = lm.model.generation_config.eos_token_id
        self.stop_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])

    @classmethod
    def for_plans(cls, lm: LoadedModel, plans: Iterable[Plan | None], *, policies: Iterable[str] = (),
                  max_context_tokens: int | None = None, question_aware: bool = False) -> PrefillEngine:
        """An engine scoring every ranking the plans use (and the registered `policies`)."""
        scorers: dict[str, tuple[str, dict]] = {name: (name, policy_params(name)) for name in policies}
        for plan in plans:
            if plan is not None:
                scorers.update(plan.scorers)
        return cls(lm, scorers=list(scorers.values()), max_context_tokens=max_context_tokens,
                   question_aware=question_aware)

    @property
    def scorer_keys(self) -> list[str]:
        """The rankings this engine's prefill computes."""
        return list(self.presses)

    # -- one prefill per sample ------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, sample: Sample) -> PrefillState:
        parts = build_prompt(sample, self.lm.tokenizer, max_context_tokens=self.max_context,
                             question_aware=self.question_aware)
        context = torch.tensor([parts.context_ids], device=self.lm.device)  # (1, T)
        rankings: dict[int, dict[str, torch.Tensor]] = {}

        def hook(module, args, kwargs, output):
            idx = module.layer_idx
            layer = kwargs["past_key_values"].layers[idx]
            scores, _ = score_policies(self.presses, module, kwargs["hidden_states"], layer.keys, layer.values,
                                       kwargs, names=self._names, observed=take_observed(module))
            rankings[idx] = {key: score[0].float() for key, score in scores.items()}  # (H_kv, T) each
            return output

        attentions = [self.layers[idx].self_attn for idx in self.compressible]
        handles = []
        try:
            for module in attentions:
                handles.append(module.register_forward_hook(hook, with_kwargs=True))
            cache = DynamicCache(config=self.lm.model.config)
            for press in self.presses.values():
                press.post_init_from_model(self.lm.model)
            observed = attentions if self._observe else []
            with (layer_rotaries(self.lm.model, self.compressible),  # ExpectedAttention reads `rotary_emb`
                  keeping_query_projections(attentions),  # scorers reuse the prefill's q_proj
                  observing_prefill(self.lm.model, observed, last=1) if observed else nullcontext()):
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
        rankings (H_kv, T) per layer and scorer key; adds the full cache's log-probs over the reference answer."""
        state = PrefillState(sample=sample, parts=parts, n_context=len(parts.context_ids), cache=cache,
                             rankings=rankings)
        if not parts.answer_ids:
            return state
        with self._recording_inputs() as inputs:
            cache, valid, _ = self._batched_cache(state, [None])
            logits = self._suffix_logits(state, cache, valid)[:, :-1]  # (1, A, V)
            state.full_logprobs = torch.log_softmax(logits, dim=-1)[0]
        state.suffix_inputs = inputs or None
        return state

    @contextmanager
    def _recording_inputs(self) -> Iterator[list[torch.Tensor]]:
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
    def layer_inputs(self, state: PrefillState, plan: Plan | None) -> list[torch.Tensor] | None:
        """Per decoder layer, the (1, S, D) hidden states entering it when the question and reference answer run
        teacher-forced on `plan`'s cache (None without a reference answer or when the model's layers cannot be
        entered one at a time)."""
        if not state.parts.answer_ids:
            return None
        cache, valid, _ = self._batched_cache(state, [plan])
        with self._recording_inputs() as inputs:
            self._suffix_logits(state, cache, valid)
        return inputs or None

    # -- per plan --------------------------------------------------------------------------------
    def full_plan(self) -> Plan:
        """Every layer keeps its whole context."""
        return Plan.full(self.lm.info)

    @torch.inference_mode()
    def run(self, state: PrefillState, plan: Plan | None, *, with_kl: bool = True) -> Answer:
        """One plan's greedy answer (and KL): the same as `run_many` with one row."""
        return self.run_many(state, [plan], with_kl=with_kl, batch_size=1)[0]

    @torch.inference_mode()
    def run_many(self, state: PrefillState, plans: Sequence[Plan | None], *, with_kl: bool = True,
                 batch_size: int = 16) -> list[Answer]:
        """Greedy answers of several plans at once (None: the full cache): one batch row per plan, each layer's
        cache padded to the longest row and the padding masked out. With `with_kl`, one teacher-forced forward
        per batch gives the KL, and its cache, rewound to the question, starts the decoding."""
        results: list[Answer] = []
        for start in range(0, len(plans), batch_size):
            group = list(plans[start:start + batch_size])
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
            for row in range(len(group)):
                results.append(Answer(sample_id=str(state.sample.id), task=state.sample.task, answer=answers[row],
                                      kl=kls[row], kept_all_layers=kept_all[row]))
        return results

    @torch.inference_mode()
    def run_windowed(self, state: PrefillState, plans: Sequence[Plan], *, with_kl: bool = True) -> list[Answer]:
        """Each per-layer window plan answered as TensorRT-LLM runs `max_attention_window`: layer l's queries see
        only the W_l newest tokens (itself included) in the context prefill, the question, the teacher-forced
        answer and the greedy decoding (the window rolls), where W_l is the layer's budget; the plan's sinks are
        not kept (the engine's attention has no sink term, docs/engines.md "Fidelity"). One prefill of the context
        per plan; the KL is to `state`'s full cache over the reference answer."""
        results = []
        for plan in plans:
            windows = self.windows_of(plan)
            kl, first_logits = None, None
            with polykv_attention(self.lm.model), attention_windows(self.layers, windows):
                cache = self._windowed_prefill(state)
                if with_kl and state.full_logprobs is not None and state.parts.answer_ids:
                    # the model's own sliding layers cannot drop their newest entries: they go back to their state
                    # after the prefill (shallow copies suffice: their update reassigns its tensors, it does not
                    # write into them), and the full-attention layers are cropped to the context to match
                    rewindable = self._rewindable(cache)
                    after_prefill = {} if rewindable else {
                        i: copy.copy(layer) for i, layer in enumerate(cache.layers) if type(layer) is not DynamicLayer}
                    logits = self._suffix_logits(state, cache)  # (1, A + 1, V)
                    logprobs = torch.log_softmax(logits[:, :-1], dim=-1)
                    full = state.full_logprobs[None]
                    kl = float((full.exp() * (full - logprobs)).sum(-1).mean(-1)[0])
                    if rewindable:  # back to the question, whose last logits start the decoding
                        for layer in cache.layers:
                            layer.crop(-len(state.parts.answer_ids))
                        first_logits = logits[:, 0]
                    else:  # back to the context: the decoding runs the question again (a short forward)
                        for i, layer in enumerate(cache.layers):
                            if i in after_prefill:
                                cache.layers[i] = after_prefill[i]
                            else:
                                layer.crop(state.n_context)
                answer = self._greedy_batch(state, cache, {}, first_logits=first_logits)[0]
            kept_all = [idx for idx, window in windows.items() if window >= state.n_context]
            results.append(Answer(sample_id=str(state.sample.id), task=state.sample.task, answer=answer, kl=kl,
                                  kept_all_layers=kept_all))
        return results

    @torch.inference_mode()
    def window_metrics(self, state: PrefillState, probes: Sequence[tuple[int, int]], *,
                       background: Mapping[int, int] | None = None) -> list[dict[str, float]]:
        """Per (layer, window) probe, teacher-forced measures over the reference answer ("kl" to the full cache,
        "nll" of the reference tokens) with that layer attending through a window of that many tokens over the
        whole prompt (context, question, answer), as TensorRT-LLM runs it (`run_windowed`), every other layer full
        or, where `background` gives it one, through its own window (the probe's window replaces the probed layer's).
        One forward over the prompt (under the background) records each layer's input; each probe runs from its own
        layer on, one forward per probe (a window is a property of the layer's module, so probes do not share a
        batch)."""
        if state.full_logprobs is None or not state.parts.answer_ids:
            return [{"kl": 0.0, "nll": 0.0} for _ in probes]
        parts = state.parts
        ids = torch.tensor([list(parts.context_ids) + list(parts.question_ids) + list(parts.answer_ids)],
                           device=self.lm.device)
        positions = torch.arange(ids.shape[1], device=self.lm.device)[None]
        model, n_answer = self.lm.model, len(parts.answer_ids)
        answer = torch.tensor(parts.answer_ids, device=state.full_logprobs.device)
        full = state.full_logprobs[None]  # (1, A, V)
        background = dict(background or {})
        with polykv_attention(model), attention_windows(self.layers, background), self._recording_inputs() as inputs:
            model.model(input_ids=ids, position_ids=positions, use_cache=False)
        out = []
        for layer, window in probes:
            start = self._start_layer(layer, inputs or None)
            feed = {"inputs_embeds": inputs[start]} if start > 0 else {"input_ids": ids}
            with polykv_attention(model), attention_windows(self.layers, {**background, layer: window}), \
                    _layers_from(model.model, start):
                logits = model(**feed, position_ids=positions, use_cache=False, logits_to_keep=n_answer + 1).logits
            logprobs = torch.log_softmax(logits.float()[:, :-1], dim=-1)  # (1, A, V)
            kl = (full.exp() * (full - logprobs)).sum(-1).mean(-1)
            nll = -logprobs[0].gather(-1, answer[:, None])[:, 0].mean()
            out.append({"kl": float(kl[0]), "nll": float(nll)})
        return out

    def windows_of(self, plan: Plan) -> dict[int, int]:
        """Per compressed layer, the window a per-layer window plan gives it (its one budget); a layer keeping its
        whole context has none. ConfigError for a plan whose layer keeps different budgets per KV head or ranks
        tokens by anything but recency (StreamingLLM): no window expresses it."""
        windows = {}
        for idx in self.compressible:
            layer = plan.layers[idx]
            choices = layer.head_choices(self.lm.info.num_kv_heads)
            if choices is None:
                continue
            budgets = {c[1] for c in choices if c is not None}
            policies = {h.policy for h in layer.heads} if layer.heads is not None else {layer.policy}
            if None in choices or len(budgets) != 1 or policies != {"streaming"}:
                raise ConfigError(f"layer {idx} of the plan is no attention window (one StreamingLLM budget for "
                                  "every KV head): only a trtllm plan is answered as TensorRT-LLM computes it")
            windows[idx] = budgets.pop()
        return windows

    def _windowed_prefill(self, state: PrefillState) -> DynamicCache:
        """The context's prefill under the attention windows set by the caller (not the shared full-cache one)."""
        cache = DynamicCache(config=self.lm.model.config)
        context = torch.tensor([state.parts.context_ids], device=self.lm.device)
        self.lm.model.model(input_ids=context, past_key_values=cache, use_cache=True)
        self.prefills += 1
        return cache

    @torch.inference_mode()
    def kl_many(self, state: PrefillState, plans: Sequence[Plan | None], *, batch_size: int = 16) -> list[float]:
        """KL(full || plan) over the reference answer for each plan: one teacher-forced forward per batch."""
        return [m["kl"] for m in self.answer_metrics_many(state, plans, batch_size=batch_size)]

    @torch.inference_mode()
    def answer_logprobs(self, state: PrefillState, plan: Plan | None) -> torch.Tensor | None:
        """(A, V) log-probs the plan's cache gives each reference answer token, teacher-forced after the question."""
        if not state.parts.answer_ids:
            return None
        cache, valid, _ = self._batched_cache(state, [plan])
        return torch.log_softmax(self._suffix_logits(state, cache, valid)[:, :-1], dim=-1)[0]

    @torch.inference_mode()
    def answer_metrics_many(self, state: PrefillState, plans: Sequence[Plan | None], *, batch_size: int = 16,
                            reference: Plan | None = None) -> list[dict[str, float]]:
        """Teacher-forced measures over the reference answer, per plan (the optimizer's end-to-end objectives):
        "kl" = mean KL(full || plan), "nll" = mean negative log-likelihood of the reference tokens,
        "miss" = share of reference tokens that are not the plan's top-1 prediction (what greedy decoding
        would get wrong given a correct prefix), "lost" = 1 - exp(-kl), the share of the full cache's output
        distribution lost (at most 1 per sample). One forward per batch, no decoding.

        `reference`: a plan the rows differ from in few layers (calibrate --around's background). Its hidden
        states are recorded in one extra pass and each row's forward starts at the first layer where its cache
        differs from the reference's (the same numbers; the layers below are skipped)."""
        if state.full_logprobs is None:
            return [{"kl": 0.0, "nll": 0.0, "miss": 0.0, "lost": 0.0} for _ in plans]
        answer = torch.tensor(state.parts.answer_ids, device=state.full_logprobs.device)  # (A,)
        full = state.full_logprobs[None]  # (1, A, V)
        # rows are batched by their first changed layer: below it every row is the full cache (or the reference),
        # whose hidden states were kept, so the forward starts there (on average half the layers for probes)
        inputs = state.suffix_inputs if reference is None else self.layer_inputs(state, reference)
        first = [0 if inputs is None else self.first_changed_layer(state, p, reference) for p in plans]
        order = sorted(range(len(plans)), key=lambda i: first[i])
        out: list[dict[str, float]] = [{} for _ in plans]
        for begin in range(0, len(order), batch_size):
            rows = order[begin:begin + batch_size]
            group = [plans[i] for i in rows]
            start = self._start_layer(min(first[i] for i in rows), inputs)
            cache, valid, _ = self._batched_cache(state, group, unused_below=start, shared_context=True)
            logits = self._suffix_logits(state, cache, valid, start=start, inputs=inputs)
            logprobs = torch.log_softmax(logits[:, :-1], dim=-1)  # (B, A, V)
            kl = (full.exp() * (full - logprobs)).sum(-1).mean(-1)  # (B,)
            nll = -logprobs.gather(-1, answer[None, :, None].expand(len(group), -1, 1))[..., 0].mean(-1)  # (B,)
            miss = (logprobs.argmax(-1) != answer[None]).float().mean(-1)  # (B,)
            for i, k, n, m in zip(rows, kl, nll, miss):
                out[i] = {"kl": float(k), "nll": float(n), "miss": float(m), "lost": float(-torch.expm1(-k))}
        return out

    def first_changed_layer(self, state: PrefillState, plan: Plan | None, reference: Plan | None = None) -> int:
        """The first layer whose cache `plan` builds differently from `reference`'s (default: the full cache);
        the layer count when none differs."""
        return next((idx for idx in self.compressible
                     if self.selection(state, plan, idx) != self.selection(state, reference, idx)), len(self.layers))

    def selection(self, state: PrefillState, plan: Plan | None, idx: int) -> HeadChoices | None:
        """What `plan` keeps in layer `idx`: per KV head (scorer, budget) or None for a head keeping its whole
        context; None when the layer keeps everything (a budget at or above the context length keeps it all)."""
        if plan is None:
            return None
        choices = plan.layers[idx].head_choices(self.lm.info.num_kv_heads)
        if choices is None:
            return None
        row = [None if c is None or c[1] >= state.n_context else c for c in choices]
        return None if all(c is None for c in row) else row

    def kept_indices(self, state: PrefillState, plan: Plan | None) -> dict[int, list[torch.Tensor]]:
        """Per compressed layer, per KV head, the context positions the plan keeps, in kvpress's top-k order
        (a whole-context head holds every position in order). The per-head extension point: any plan whose
        layers name a scorer and budget per head is built from these."""
        kept: dict[int, list[torch.Tensor]] = {}
        for idx in self.compressible:
            row = self.selection(state, plan, idx)
            if row is None:
                continue
            heads, ranked = [], {}
            for head, choice in enumerate(row):
                if choice is None:
                    heads.append(torch.arange(state.n_context))
                    continue
                key, budget = choice
                if (key, budget) not in ranked:  # one top-k per (scorer, budget) over every head of the layer
                    ranked[key, budget] = self._ranking(state, idx, key).topk(int(budget), dim=-1).indices
                heads.append(ranked[key, budget][head])
            kept[idx] = heads
        return kept

    def footprint(self, state: PrefillState, plan: Plan | None) -> tuple[int, int]:
        """(context entries kept over the compressible layers and KV heads, bytes the whole cache allocates) right
        after the context prefill, as the runtime lays the plan out: one length per layer (dense) for a per-layer
        plan, one per KV head (ragged) for a per-head one; sliding-window layers hold their window."""
        heads, n = self.lm.info.num_kv_heads, state.n_context
        entries = 0
        for idx in self.compressible:
            row = self.selection(state, plan, idx)
            entries += n * heads if row is None else sum(n if c is None else int(c[1]) for c in row)
        sliding = sum(state.cache.layers[i].keys.shape[-2] * heads  # what the window layer holds after the prefill
                      for i in range(len(self.layers)) if i not in self.compressible)
        layer = state.cache.layers[self.compressible[0]] if self.compressible else state.cache.layers[0]
        per_entry = 2 * layer.keys.shape[-1] * layer.keys.element_size()  # a key and a value
        return entries, (entries + sliding) * per_entry

    def _ranking(self, state: PrefillState, idx: int, key: str) -> torch.Tensor:
        try:
            return state.rankings[idx][key]
        except KeyError:
            raise ConfigError(f"the engine did not score {key!r}; build it with PrefillEngine.for_plans(lm, plans) "
                              f"or add it to `scorers` (it scores {', '.join(state.rankings[idx]) or 'nothing'})"
                              ) from None

    @staticmethod
    def _room(state: PrefillState) -> int:
        """Cache slots a plan's cache needs after the context: the question, then the answer or the decoding."""
        return len(state.parts.question_ids) + max(len(state.parts.answer_ids), state.parts.max_new_tokens) + 1

    def _start_layer(self, start: int, inputs: list[torch.Tensor] | None) -> int:
        """The layer a teacher-forced forward can begin at: `start`, or 0 where it cannot skip layers (no kept
        hidden states, a multimodal wrapper whose decoder layers are not ours, or rows that change no layer)."""
        if inputs is None or getattr(self.lm.model.model, "layers", None) is not self.layers \
                or start >= len(self.layers):
            return 0
        return start

    def _batched_cache(self, state: PrefillState, plans: Sequence[Plan | None], *, unused_below: int = 0,
                       shared_context: bool = False):
        """A batch-B cache (one row per plan), the validity masks of the padded slots per compressed layer
        ((B, K_l), or (B, H_kv, K_l) when the KV heads of a row keep different numbers of tokens) and, per row,
        the layers whose budget kept the whole context. Layers below `unused_below` (which every row holds whole,
        and which a forward starting there neither reads nor writes) are shared views, not copies: for probes
        that change one deep layer, most of the cache. `shared_context` (one teacher-forced forward, no decoding;
        CPU): a full-attention layer every row holds whole keeps the context once for all rows (SharedContextLayer)."""
        batch, n = len(plans), state.n_context
        cache = copy.copy(state.cache)
        cache.layers = []
        valid: dict[int, torch.Tensor] = {}
        kept = [self.kept_indices(state, plan) for plan in plans]
        kept_all: list[list[int]] = [[] for _ in plans]
        for row, plan in enumerate(plans):
            for idx in self.compressible:
                if plan is not None and idx not in kept[row] and \
                        plan.layers[idx].head_choices(self.lm.info.num_kv_heads) is not None:
                    kept_all[row].append(idx)  # a budget at or above the context length
        room = self._room(state)
        for idx, layer in enumerate(state.cache.layers):
            keys, values = layer.keys, layer.values  # (1, H_kv, T', D)
            if idx < unused_below:
                unused = copy.copy(layer)
                unused.keys, unused.values = keys.expand(batch, -1, -1, -1), values.expand(batch, -1, -1, -1)
                cache.layers.append(unused)
                continue
            if not any(idx in k for k in kept):
                module = self.layers[idx].self_attn  # the shared attention is causal, without soft-capping
                if shared_context and keys.device.type == "cpu" and type(layer) is DynamicLayer \
                        and getattr(module, "is_causal", True) and not logit_softcap(module):
                    cache.layers.append(SharedContextLayer(keys, values, batch, room))
                    continue
                # expanded views: a sliding layer's update() concatenates them into a new tensor
                cache.layers.append(_reserved(layer, keys.expand(batch, -1, -1, -1),
                                              values.expand(batch, -1, -1, -1), room))
                continue
            num_kv = keys.shape[1]
            every = torch.arange(n)
            heads = [k.get(idx, [every] * num_kv) for k in kept]  # per row, per KV head: positions kept
            lengths = torch.tensor([[len(h) for h in row] for row in heads])  # (B, H_kv)
            longest = int(lengths.max())
            index = torch.zeros(batch, num_kv, longest, dtype=torch.long)  # (B, H_kv, K_l), pad -> position 0
            for row, positions in enumerate(heads):
                for head, kept_positions in enumerate(positions):
                    index[row, head, :len(kept_positions)] = kept_positions
            slots = torch.arange(longest)[None, None]  # (1, 1, K_l)
            mask = slots < lengths[..., None]  # (B, H_kv, K_l)
            if bool((lengths == lengths[:, :1]).all()):
                mask = mask[:, 0]  # (B, K_l): every head of a row keeps as many tokens
            gather = index[..., None].expand(-1, -1, -1, keys.shape[-1]).to(keys.device)  # (B, H_kv, K_l, D)
            cache.layers.append(_reserved(layer, keys.expand(batch, -1, -1, -1).gather(2, gather),
                                          values.expand(batch, -1, -1, -1).gather(2, gather), room))
            valid[idx] = mask.to(keys.device)
        return cache, valid, kept_all

    def _greedy_batch(self, state: PrefillState, cache: DynamicCache, valid: dict[int, torch.Tensor],
                      first_logits: torch.Tensor | None = None) -> list[str]:
        """Greedy answers, one per batch row (kvpress's generate_answer: the question at its true positions, then
        token by token). `first_logits` (B, V): the question is already in `cache` and these are its last
        position's logits (from a teacher-forced pass rewound to the question)."""
        model, device = self.lm.model, self.lm.device
        batch = cache.layers[0].keys.shape[0]
        n, question = state.n_context, state.parts.question_ids
        position_ids = torch.arange(n, n + len(question), device=device)[None].expand(batch, -1)  # (B, q)
        generated = torch.zeros(batch, 0, dtype=torch.long)
        finished = torch.zeros(batch, dtype=torch.bool)
        stop = torch.tensor(sorted(self.stop_ids), dtype=torch.long)
        with polykv_attention(model), validity_masks(self.layers, valid):
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
        answers = []
        for row in generated.tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in self.stop_ids), len(row))
            answers.append(str(self.lm.tokenizer.decode(row[:cut], skip_special_tokens=True)))
        return answers

    def _scored_part_done(self, state: PrefillState, tokens: list[int]) -> bool:
        """Whether the answer so far already holds everything its task's metric reads (the first line of a one-line
        answer): decoding further would not change the score, only the time."""
        return scored_part_complete(state.sample.task, self.lm.tokenizer.decode(tokens, skip_special_tokens=True))

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
        model = self.lm.model
        inputs_at = inputs if inputs is not None else state.suffix_inputs
        start = self._start_layer(start, inputs_at)
        feed = {"input_ids": torch.tensor([suffix] * batch, device=self.lm.device)}
        if start > 0:
            feed = {"inputs_embeds": inputs_at[start].expand(batch, -1, -1)}
        with polykv_attention(model), validity_masks(self.layers, valid), _layers_from(model.model, start):
            out = model(**feed, past_key_values=cache, position_ids=position_ids, logits_to_keep=len(answer) + 1)
        return out.logits.float()


@contextmanager
def _layers_from(inner: torch.nn.Module, start: int) -> Iterator[None]:
    """Run only the decoder layers from `start` on (each keeps its own layer_idx); restored on exit."""
    if start <= 0:
        yield
        return
    layers = inner.layers
    inner.layers = torch.nn.ModuleList(list(layers)[start:])
    try:
        yield
    finally:
        inner.layers = layers


def _reserved(layer, keys: torch.Tensor, values: torch.Tensor, room: int):
    """A layer for one plan's decoding: full-attention layers get a ReservedLayer (decoding writes in place);
    other layer kinds (sliding windows) a shallow copy holding `keys`/`values`. The prefill's layer is untouched."""
    if type(layer) is DynamicLayer:
        return ReservedLayer(keys, values, room)
    new = copy.copy(layer)
    new.keys, new.values = keys, values
    return new
