"""An SDPA attention function that is correct when layers hold caches of different lengths.

transformers builds one causal mask per layer type from one layer's cache size; after a per-layer plan the
other layers' key counts differ, and SDPA fails (or, with a mask of matching size but the original positions,
attends to future query tokens). Registered as "polykv_sdpa", this function notices a layer whose cache holds
fewer keys than the positions its queries sit at (tokens were evicted) and builds the causal mask from the
layer's own key count: the q queries are the last q positions, so key j is visible to query i iff
j <= K - q + i (bottom-right aligned). Batch rows of different plans mark padded cache slots with
`validity_masks`: (B, K_cached), or (B, H_kv, K_cached) when the KV heads of a row keep different numbers of
tokens (each head's padding hidden from the query heads of its group). A layer whose cache was not shrunk, and
sliding-window layers, which no plan compresses, keep transformers' own mask, padding included: on caches no plan
touched this function is exactly SDPA, so leaving a model switched to it changes nothing for ordinary use.

`attention_windows` gives layers a sliding window of their own (TensorRT-LLM's `max_attention_window` per layer,
applied in the prefill and in every later step, no sink term): on a full cache, key j is visible to query i iff
0 <= pos_i - pos_j < W_l, which computes what the engine's cyclic cache of W_l tokens computes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionMaskInterface,
    sdpa_mask,
)

from polykv_search.errors import ConfigError
from polykv_search.models.anatomy import decoder_layers, logit_softcap
from polykv_search.policies.scoring import observed_attention
from polykv_search.runtime.ragged import RaggedKV, ragged_attention
from polykv_search.runtime.shared import SharedKV, shared_context_attention

ATTENTION_NAME = "polykv_sdpa"
OBSERVE_ATTR = "polykv_observe"  # int on an attention module: observe its next fresh prefill, keeping >= n last rows
OBSERVED_ATTR = "polykv_observed"  # what the observation left: (column sums, last query chunk's probabilities)
VALID_ATTR = "polykv_valid"  # bool mask of a batch's padded cache slots, set by `validity_masks`
CONSTANT_ATTR = "polykv_constant_cache"  # set on an attention module: its cached keys are constants to autograd
WINDOW_ATTR = "polykv_window"  # int on an attention module: each query sees only the window of keys ending at it
WINDOW_BLOCK = 512  # queries per block of a windowed prefill


def evicted(key: torch.Tensor, position_ids: torch.Tensor | None) -> bool:
    """Whether a layer's cache holds fewer keys than the positions its queries sit at: tokens were evicted, so
    transformers' mask (built from another layer's length and the absolute positions) does not describe it."""
    return position_ids is not None and key.shape[2] < int(position_ids.max()) + 1


@contextmanager
def validity_masks(layers: Sequence[torch.nn.Module], masks: Mapping[int, torch.Tensor] | None) -> Iterator[None]:
    """Within the block, the attention of decoder layer i hides the cache slots where masks[i] is False
    ((B, K_cached) or (B, H_kv, K_cached)); nothing is left on the modules afterwards."""
    modules = [layers[idx].self_attn for idx in (masks or {})]
    try:
        for idx, module in zip(masks or {}, modules):
            module.__dict__[VALID_ATTR] = masks[idx]
        yield
    finally:
        for module in modules:
            module.__dict__.pop(VALID_ATTR, None)


@contextmanager
def attention_windows(layers: Sequence[torch.nn.Module], windows: Mapping[int, int] | None) -> Iterator[None]:
    """Within the block, decoder layer i attends with a sliding window of windows[i] tokens (each query sees itself
    and the windows[i] - 1 keys before it, over a cache that keeps every token; batch rows must hold no padding).
    The model must be on "polykv_sdpa" (`polykv_attention`); nothing is left on the modules afterwards."""
    modules = [layers[idx].self_attn for idx in (windows or {})]
    try:
        for idx, module in zip(windows or {}, modules):
            if int(windows[idx]) < 1:
                raise ConfigError(f"layer {idx}: an attention window must hold at least 1 token, not {windows[idx]}")
            module.__dict__[WINDOW_ATTR] = int(windows[idx])
        yield
    finally:
        for module in modules:
            module.__dict__.pop(WINDOW_ATTR, None)


def window_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     window: int, scale: float, dropout: float, scaling: float | None,
                     **kwargs) -> tuple[torch.Tensor, None]:
    """Attention of the q newest positions over a full cache of K keys (the queries are the last q positions), each
    query seeing the `window` keys that end at its own position: a band of the causal mask. A long run of queries
    goes in blocks of WINDOW_BLOCK, each over the keys its band reaches, so a narrow window costs q x (window +
    block) scores instead of q x K."""
    q_len, k_len = query.shape[2], key.shape[2]
    if window >= k_len and q_len == k_len:  # the band is the whole causal triangle
        return sdpa_attention_forward(module, query, key, value, None, dropout, scaling, True, **kwargs)
    if q_len == 1 and not (dropout or logit_softcap(module)):  # decoding: the window's last keys, no mask
        return grouped_attention(query, key[:, :, -window:], value[:, :, -window:], None, scale)
    outputs = []
    for start in range(0, q_len, WINDOW_BLOCK):
        stop = min(start + WINDOW_BLOCK, q_len)
        first, last = k_len - q_len + start, k_len - q_len + stop  # the block's positions: first .. last - 1
        low = max(0, first - window + 1)  # the oldest key the block's band reaches
        behind = torch.arange(first, last, device=query.device)[:, None] - torch.arange(
            low, last, device=query.device)[None, :]  # (block, keys)
        mask = ((behind >= 0) & (behind < window))[None, None]  # (1, 1, block, keys)
        out, _ = sdpa_attention_forward(module, query[:, :, start:stop], key[:, :, low:last], value[:, :, low:last],
                                        mask, dropout, scaling, False, **kwargs)
        outputs.append(out)  # (B, block, H, D)
    return torch.cat(outputs, dim=1), None


def polykv_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """query (B, H, q, D), key/value (B, H_kv, K, D); same contract as transformers' sdpa_attention_forward."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if isinstance(key, RaggedKV):  # a per-head plan's layer: each KV head holds its own tokens
        return ragged_attention(query, key, value, scaling=scale), None
    if isinstance(key, SharedKV):  # probes' rows sharing one whole context
        return shared_context_attention(query, key, value, scaling=scale), None
    q_len, k_len = query.shape[2], key.shape[2]
    valid = module.__dict__.get(VALID_ATTR)  # (B, K_cached) or (B, H_kv, K_cached) bool, or None
    if getattr(module, "is_sliding", False) or getattr(module, "sliding_window", None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal,
                                      **kwargs)
    window = module.__dict__.get(WINDOW_ATTR)
    if window is not None:
        if valid is not None or evicted(key, kwargs.get("position_ids")):
            raise ConfigError("an attention window runs over a cache that keeps every token and rows without "
                              "padding: apply it to a full cache, one plan per batch")
        return window_attention(module, query, key, value, window, scale, dropout, scaling, **kwargs)
    observe = getattr(module, OBSERVE_ATTR, None)
    if observe is not None and q_len == k_len and query.shape[0] == 1 and valid is None:
        out, observed = observed_attention(module, query, key, value, attention_mask, scale, last=observe)
        setattr(module, OBSERVED_ATTR, observed)
        return out, None
    if getattr(module, CONSTANT_ATTR, False) and torch.is_grad_enabled() and valid is None \
            and not evicted(key, kwargs.get("position_ids")) and not (dropout or logit_softcap(module)):
        return constant_cache_attention(query, key, value, scale)
    mask_fits = attention_mask is None or attention_mask.shape[-1] == k_len
    if valid is None and mask_fits and not evicted(key, kwargs.get("position_ids")):  # transformers' mask is right
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal,
                                      **kwargs)
    mask = None
    if q_len > 1:
        q_pos = torch.arange(k_len - q_len, k_len, device=query.device)[:, None]  # (q, 1) positions in this cache
        mask = torch.arange(k_len, device=query.device)[None, :] <= q_pos  # (q, K) bottom-right causal
        mask = mask[None, None]  # (1, 1, q, K)
    if valid is not None:
        if valid.dim() == 2:
            valid = valid[:, None]  # (B, 1, K_cached): one mask for every KV head
        pad = torch.ones(*valid.shape[:2], k_len - valid.shape[-1], dtype=torch.bool, device=valid.device)
        rows = torch.cat([valid, pad], dim=-1)[:, :, None, :]  # (B, 1|H_kv, 1, K): new tokens are always valid
        mask = rows if mask is None else mask & rows
    softcap = logit_softcap(module)
    if dropout or softcap:
        if mask is not None and mask.shape[1] > 1:  # per KV head: SDPA's mask is per query head
            mask = mask.repeat_interleave(query.shape[1] // mask.shape[1], dim=1)
        return sdpa_attention_forward(module, query, key, value, mask, dropout, scaling, False, **kwargs)
    return grouped_attention(query, key, value, mask, scale)


def grouped_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                      scale: float) -> tuple[torch.Tensor, None]:
    """Masked attention with each KV head shared by its group of query heads, without copying keys per query head.

    query (B, H, q, D), key/value (B, H_kv, K, D), mask (B|1, 1|H_kv, q|1, K) bool (True = visible: one mask for
    every KV head, or one per KV head shared by its group of query heads) or None; returns
    ((B, q, H, D), None) as transformers' attention functions do. SDPA's path for a mask first repeats K and V
    for every query head: a fresh (B, H, K, D) copy per layer and decoding step, whose page faults made batched
    decoding up to 30x slower on CPU (9 ms against 0.3 ms a layer late in a run); here the query heads of a group
    are rows of one matmul against their shared keys.
    """
    batch, num_heads, q_len, head_dim = query.shape
    num_kv, k_len = key.shape[1], key.shape[2]
    group = num_heads // num_kv
    grouped = query.reshape(batch, num_kv, group * q_len, head_dim)  # head h uses KV head h // group
    logits = torch.matmul(grouped, key.transpose(-1, -2)).mul_(scale)  # (B, H_kv, G*q, K)
    if mask is not None:
        hidden = ~mask.expand(mask.shape[0], mask.shape[1], q_len, k_len)[:, :, None]  # (B|1, 1|H_kv, 1, q, K)
        logits.view(batch, num_kv, group, q_len, k_len).masked_fill_(hidden, float("-inf"))
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(value.dtype)
    out = torch.matmul(probs, value)  # (B, H_kv, G*q, D)
    return out.view(batch, num_heads, q_len, head_dim).transpose(1, 2).contiguous(), None


def constant_cache_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float,
                             ) -> tuple[torch.Tensor, None]:
    """Causal attention of the q new queries over a cache whose first K - q keys and values are constants to
    autograd (the gradient flows to the queries and the new tokens' keys and values only).

    query (B, H, q, D), key/value (B, H_kv, K, D), the new tokens last; returns ((B, q, H, D), None). The same
    forward as SDPA's; its backward skips what SDPA's computes for every cached key (their gradients, and the sum
    over each group of query heads), which was 75% of `calibrate --head-fisher`'s backward passes over a
    2,747-token context (benchmarks/head_fisher_check.py).
    """
    batch, num_heads, q_len, head_dim = query.shape
    num_kv, k_len = key.shape[1], key.shape[2]
    group, cached = num_heads // num_kv, k_len - q_len
    grouped = query.reshape(batch, num_kv, group * q_len, head_dim)  # head h uses KV head h // group
    old = torch.matmul(grouped, key[:, :, :cached].detach().transpose(-1, -2))  # (B, H_kv, G*q, cached)
    new = torch.matmul(grouped, key[:, :, cached:].transpose(-1, -2)).view(batch, num_kv, group, q_len, q_len)
    future = torch.ones(q_len, q_len, dtype=torch.bool, device=query.device).triu_(1)
    new = new.masked_fill(future, float("-inf")).view(batch, num_kv, group * q_len, q_len)
    wide = torch.promote_types(value.dtype, torch.float32)  # float32 at least, as SDPA's softmax
    probs = torch.softmax(torch.cat([old, new], dim=-1) * scale, dim=-1, dtype=wide).to(value.dtype)
    to_old, to_new = probs.split([cached, q_len], dim=-1)  # its backward is one cat, not two zero-filled copies
    out = torch.matmul(to_old, value[:, :, :cached].detach()) + torch.matmul(
        to_new, value[:, :, cached:])  # (B, H_kv, G*q, D)
    return out.view(batch, num_heads, q_len, head_dim).transpose(1, 2).contiguous(), None


@contextmanager
def constant_cache(model: torch.nn.Module) -> Iterator[None]:
    """Within the block, gradients through the model's attention treat every layer's cache as constants (see
    `constant_cache_attention`); the model is switched to "polykv_sdpa" for the duration if it is on SDPA, and left
    as it is otherwise (then autograd runs through its own kernel: the same gradients, slower)."""
    try:
        previous = use_polykv_attention(model)
    except ConfigError:
        yield
        return
    modules = [layer.self_attn for layer in decoder_layers(model)]
    try:
        for module in modules:
            setattr(module, CONSTANT_ATTR, True)
        yield
    finally:
        for module in modules:
            module.__dict__.pop(CONSTANT_ATTR, None)
        restore_attention(previous)


def register() -> None:
    """Make "polykv_sdpa" known to transformers (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, polykv_sdpa_forward)
    if ATTENTION_NAME not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def use_polykv_attention(model: torch.nn.Module) -> list[tuple[Any, str]]:
    """Switch `model` to "polykv_sdpa"; returns what to restore. Only SDPA models are switched."""
    register()
    configs = {id(c): c for c in _configs(model)}.values()
    previous = [(c, c._attn_implementation) for c in configs]
    for config, name in previous:
        if name not in ("sdpa", ATTENTION_NAME, None):
            raise ConfigError(f"plans run on SDPA attention; this model uses {name!r}: load it with "
                              "attn_implementation='sdpa'")
        config._attn_implementation = ATTENTION_NAME
    return previous


@contextmanager
def polykv_attention(model: torch.nn.Module) -> Iterator[None]:
    """Switch `model` to the per-layer-length-safe attention for the duration; restore it after."""
    previous = use_polykv_attention(model)
    try:
        yield
    finally:
        restore_attention(previous)


def restore_attention(previous: list[tuple[Any, str]]) -> None:
    """Undo `use_polykv_attention`: put back the attention implementations it recorded."""
    for config, name in previous:
        config._attn_implementation = name


@contextmanager
def observing_prefill(model: torch.nn.Module, modules: list[torch.nn.Module], *, last: int) -> Iterator[bool]:
    """Let `modules` observe their prefill attention inside the model's own attention call (H2O's column sums
    without a second pass over the logits). Yields False, observing nothing, when the model is not on SDPA."""
    try:
        previous = use_polykv_attention(model)
    except ConfigError:  # eager or another kernel: the caller recomputes the attention it needs
        yield False
        return
    try:
        for module in modules:
            setattr(module, OBSERVE_ATTR, int(last))
        yield True
    finally:
        for module in modules:
            module.__dict__.pop(OBSERVE_ATTR, None)
            module.__dict__.pop(OBSERVED_ATTR, None)
        restore_attention(previous)


def take_observed(module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The observation a module's last prefill left (consumed: a later forward cannot reuse a stale one)."""
    return module.__dict__.pop(OBSERVED_ATTR, None)


def _configs(model: torch.nn.Module) -> list:
    found = [model.config]
    text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    if text is not None:
        found.append(text)
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            found.append(config)
    return found
