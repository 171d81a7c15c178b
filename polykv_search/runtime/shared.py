"""A batch cache layer whose rows share one context: probes' rows, which all hold the whole context in most layers.

calibrate's probes run many plans as batch rows of one teacher-forced forward; each row changes one layer (or one KV
head), so in every other layer all rows hold the same full context and differ only in the question and answer
tokens they append. A dense (B, H_kv, T + s, D) layer copies the context into every row, and SDPA's grouped path
then repeats it for every query head: on SmolLM2 in bfloat16 those copies cost as much as the probes' attention
itself. A SharedContextLayer keeps the context once, (1, H_kv, T, D), a view of the full cache (nothing copied),
and a buffer per row for the tokens appended after it; attention reads it through `shared_context_attention`: one
call of SDPA's CPU kernel for every row's queries against the shared keys, a small per-row block for the appended
tokens, joined by their log-sum-exps.

Teacher-forced forwards on CPU only (the probes' `answer_metrics_many`): the layer has room for the tokens it was
built for and cannot be cropped or reordered (a decoding caller would use ReservedLayer), and the kernel that
returns the log-sum-exp is SDPA's CPU one (on a GPU the dense copies are cheap anyway). In bfloat16 the kernel's
output is rounded before the join, once more than SDPA's over a dense cache: differences at bfloat16's noise, which
already makes single probes' small KLs unreliable in bfloat16 (docs/results-per-head.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

from polykv_search.policies.attention import attention_with_logsumexp


@dataclass(frozen=True)
class SharedKV:
    """One layer's keys or values: a context shared by every row, then each row's own appended tokens."""

    context: torch.Tensor  # (1, H_kv, T, D)
    own: torch.Tensor  # (B, H_kv, s, D)

    @property
    def dtype(self) -> torch.dtype:
        return self.context.dtype

    @property
    def device(self) -> torch.device:
        return self.context.device

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The dense shape this stands for, (B, H_kv, T + s, D): what code that only reads sizes expects."""
        batch, heads, appended, dim = self.own.shape
        return (batch, heads, self.context.shape[2] + appended, dim)


class SharedContextLayer(CacheLayerMixin):
    """A full-attention cache layer of `batch` rows holding the same context, with room for `room` new tokens."""

    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, batch: int, room: int) -> None:
        """keys, values: (1, H_kv, T, D), the context every row holds (kept as given: a view, not a copy)."""
        super().__init__()
        if keys.shape[0] != 1:
            raise ValueError(f"the shared context is one sequence; got a batch of {keys.shape[0]}")
        self._context_keys, self._context_values = keys, values
        shape = (batch, keys.shape[1], room, keys.shape[-1])
        self._own_keys, self._own_values = keys.new_empty(shape), values.new_empty(shape)
        self._used = 0
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    @property
    def keys(self) -> SharedKV:
        return SharedKV(self._context_keys, self._own_keys[:, :, :self._used])

    @keys.setter
    def keys(self, value: Any) -> None:
        if value is not None:  # CacheLayerMixin.__init__ sets None before the buffers exist
            raise TypeError("a shared-context cache layer's keys cannot be replaced")

    @property
    def values(self) -> SharedKV:
        return SharedKV(self._context_values, self._own_values[:, :, :self._used])

    @values.setter
    def values(self, value: Any) -> None:
        if value is not None:
            raise TypeError("a shared-context cache layer's values cannot be replaced")

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Built from its context: nothing to do lazily."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[SharedKV, SharedKV]:
        """Append the new (B, H_kv, q, D) keys and values after the shared context; return the whole layer."""
        stop = self._used + key_states.shape[-2]
        if stop > self._own_keys.shape[2] or key_states.shape[0] != self._own_keys.shape[0]:
            raise ValueError(f"a shared-context layer holds {tuple(self._own_keys.shape[:1])} rows and "
                             f"{self._own_keys.shape[2]} appended tokens; got states {tuple(key_states.shape)} "
                             f"after {self._used}")
        self._own_keys[:, :, self._used:stop] = key_states
        self._own_values[:, :, self._used:stop] = value_states
        self._used = stop
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._context_keys.shape[2] + self._used

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        return self.get_seq_length() + cache_position.shape[0], 0

    def get_max_cache_shape(self) -> int:
        return -1

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("a shared-context layer serves one teacher-forced forward; it cannot be cropped")

    def reset(self) -> None:
        raise NotImplementedError("a shared-context layer serves one teacher-forced forward; build a new cache")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("a shared-context layer's rows cannot be reordered")


def shared_context_attention(query: torch.Tensor, key: SharedKV, value: SharedKV, *,
                             scaling: float) -> torch.Tensor:
    """Attention of query (B, H, q, D) over a shared context (every key visible) and each row's s appended tokens
    (causal: the q queries are the last q of them). Returns (B, q, H, D), as transformers' attention functions do.

    Two blocks joined by their log-sum-exps: every row's queries against the shared context in one call of SDPA's
    CPU kernel (the query heads of a KV head and the batch rows stacked as one long query, no mask), which gives
    each query's output and log-sum-exp without materializing the logits; then the small per-row block of appended
    tokens, in float32. Materializing the context block's logits instead measured 2x slower than the dense cache in
    bfloat16 (converting them to float32 and back, for the softmax, was most of it)."""
    batch, num_heads, q_len, head_dim = query.shape
    num_kv, appended = key.context.shape[1], key.own.shape[2]
    group = num_heads // num_kv
    grouped = query.reshape(batch, num_kv, group * q_len, head_dim)  # head h uses KV head h // group
    stacked = grouped.transpose(0, 1).reshape(1, num_kv, batch * group * q_len, head_dim)  # (1, H_kv, B*G*q, D)
    shared, shared_lse = attention_with_logsumexp(stacked, key.context, value.context, causal=False,
                                                  scale=scaling)  # (1, H_kv, B*G*q, D), (1, H_kv, B*G*q)
    wide = torch.promote_types(query.dtype, torch.float32)  # the appended block and the join: float32 at least
    shared = shared[0].view(num_kv, batch, group * q_len, head_dim).transpose(0, 1).to(wide)  # (B, H_kv, G*q, D)
    shared_lse = shared_lse[0].view(num_kv, batch, group * q_len).transpose(0, 1)[..., None]  # (B, H_kv, G*q, 1)
    own = torch.matmul(grouped.to(wide), key.own.to(wide).transpose(-1, -2)).mul_(scaling)  # (B, H_kv, G*q, s)
    future = torch.ones(q_len, appended, dtype=torch.bool, device=query.device).triu_(appended - q_len + 1)
    own.view(batch, num_kv, group, q_len, appended).masked_fill_(future, float("-inf"))
    own_lse = torch.logsumexp(own, dim=-1, keepdim=True)  # (B, H_kv, G*q, 1)
    total = torch.logaddexp(shared_lse, own_lse)
    out = shared * (shared_lse - total).exp() + torch.matmul((own - total).exp(), value.own.to(wide))
    return out.to(query.dtype).reshape(batch, num_heads, q_len, head_dim).transpose(1, 2).contiguous()
