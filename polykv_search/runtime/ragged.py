"""A cache layer holding a different number of tokens in each KV head: a per-head plan's memory, really saved.

A transformers cache layer is dense, (B, H_kv, T, D): every head of a layer would be padded to the layer's longest
head (1.7-2.4x the entries of SmolLM2's per-head plans). A RaggedLayer keeps one buffer per KV head, (capacity_h, D),
holding exactly that head's kept tokens after compression; decoding appends each new token to every head, growing
a head's buffer by an eighth (at least 32 slots) when it is full. Attention reads it through `ragged_attention`:
per KV head, its query heads attend to its own tokens (SDPA on each head group), so nothing is padded. Batch size 1.

kvpress's pipeline removes an answer from the cache by slicing every layer's `keys`/`values` to a length; a
RaggedLayer's length is its longest compressed head plus the tokens appended since, and the same slice drops the
appended tokens from every head.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.functional import scaled_dot_product_attention
from transformers.cache_utils import CacheLayerMixin

MIN_GROWTH = 32  # slots added to a full head buffer at least (and an eighth of its length at least)


@dataclass(frozen=True)
class RaggedKV:
    """One layer's keys or values as one (length_h, D) tensor per KV head, and the layer's position count."""

    heads: tuple[torch.Tensor, ...]
    length: int  # the layer's sequence length: its longest compressed head plus the tokens appended since
    appended: int = 0  # tokens appended to every head since compression (the only ones a cut may remove)

    @property
    def dtype(self) -> torch.dtype:
        return self.heads[0].dtype

    @property
    def device(self) -> torch.device:
        return self.heads[0].device

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The dense shape this would have, (1, H_kv, length, D): what code that only reads sizes expects."""
        return (1, len(self.heads), self.length, self.heads[0].shape[-1])

    def __getitem__(self, index: Any) -> RaggedKV:
        """`kv[:, :, :n]` (kvpress's pipeline, removing an answer): drop the last length - n tokens of every head."""
        if not isinstance(index, tuple) or len(index) != 3 or not isinstance(index[2], slice) \
                or index[2].start not in (None, 0) or index[2].step not in (None, 1) or index[:2] != (slice(None),) * 2:
            raise TypeError("a ragged cache layer can only be cut to its first n positions: kv[:, :, :n]")
        stop = self.length if index[2].stop is None else min(int(index[2].stop), self.length)
        drop = self.length - stop
        if drop > self.appended:
            raise ValueError(f"cannot cut {drop} positions: only the {self.appended} tokens appended after "
                             "compression can be removed")
        return RaggedKV(heads=tuple(h[:len(h) - drop] for h in self.heads), length=stop,
                        appended=self.appended - drop)


class RaggedLayer(CacheLayerMixin):
    """A full-attention cache layer whose KV heads hold different numbers of tokens (batch size 1)."""

    is_sliding = False

    def __init__(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
        """keys[h], values[h]: (length_h, D), the tokens KV head h keeps, in cache order."""
        super().__init__()
        if len(keys) != len(values) or not keys:
            raise ValueError("give one keys and one values tensor per KV head")
        self._keys = [k.contiguous().clone() for k in keys]  # buffers: exactly the kept tokens, no room yet
        self._values = [v.contiguous().clone() for v in values]
        self._used = [len(k) for k in keys]
        self._appended = 0  # tokens added to every head since compression
        self._base = max(self._used)
        self.dtype, self.device = keys[0].dtype, keys[0].device
        self.is_initialized = True

    @classmethod
    def from_dense(cls, keys: torch.Tensor, values: torch.Tensor, kept: Sequence[torch.Tensor]) -> RaggedLayer:
        """The layer keeping, in KV head h, the positions kept[h] of the dense (1, H_kv, T, D) keys and values."""
        if keys.shape[0] != 1:
            raise ValueError(f"a ragged cache holds one sequence; got a batch of {keys.shape[0]}")
        return cls([keys[0, h, idx.to(keys.device)] for h, idx in enumerate(kept)],
                   [values[0, h, idx.to(values.device)] for h, idx in enumerate(kept)])

    # -- what attention reads --------------------------------------------------------------------
    @property
    def keys(self) -> RaggedKV:
        return RaggedKV(heads=tuple(b[:n] for b, n in zip(self._keys, self._used)), length=self.get_seq_length(),
                        appended=self._appended)

    @keys.setter
    def keys(self, value: Any) -> None:
        self._cut(value)

    @property
    def values(self) -> RaggedKV:
        return RaggedKV(heads=tuple(b[:n] for b, n in zip(self._values, self._used)), length=self.get_seq_length(),
                        appended=self._appended)

    @values.setter
    def values(self, value: Any) -> None:
        self._cut(value)

    def _cut(self, value: Any) -> None:
        """Accept a cut of this layer (RaggedKV from `keys[:, :, :n]`); anything else is refused."""
        if value is None and not hasattr(self, "_used"):
            return  # CacheLayerMixin.__init__ sets keys/values to None before the buffers exist
        if not isinstance(value, RaggedKV) or len(value.heads) != len(self._used):
            raise TypeError("a ragged cache layer's keys and values can only be cut, not replaced")
        drop = self.get_seq_length() - value.length
        if drop > 0:
            self._used = [n - drop for n in self._used]
            self._appended -= drop

    # -- transformers' cache layer interface ---------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Built from its kept tokens: nothing to do lazily."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[RaggedKV, RaggedKV]:
        """Append the new (1, H_kv, q, D) keys and values to every head; return the whole layer."""
        if key_states.shape[0] != 1 or key_states.shape[1] != len(self._used):
            raise ValueError(f"a ragged cache layer takes (1, {len(self._used)}, q, D) states, got "
                             f"{tuple(key_states.shape)}")
        q = key_states.shape[2]
        for h in range(len(self._used)):
            self._keys[h], self._values[h] = _room(self._keys[h], self._used[h], q), _room(self._values[h],
                                                                                              self._used[h], q)
            self._keys[h][self._used[h]:self._used[h] + q] = key_states[0, h]
            self._values[h][self._used[h]:self._used[h] + q] = value_states[0, h]
            self._used[h] += q
        self._appended += q
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._base + self._appended

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        return self.get_seq_length() + cache_position.shape[0], 0

    def get_max_cache_shape(self) -> int:
        return -1

    def crop(self, max_length: int) -> None:
        """Drop tokens appended since compression, down to `max_length` positions (negative: that many fewer)."""
        stop = max_length if max_length >= 0 else self.get_seq_length() + max_length
        self._cut(self.keys[:, :, :stop])

    def reset(self) -> None:
        raise NotImplementedError("a ragged cache layer holds one compressed context; build a new cache instead")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("a ragged cache layer holds one sequence; beam search is not supported")

    def offload(self) -> None:
        self._keys = [b.to("cpu", non_blocking=True) for b in self._keys]
        self._values = [b.to("cpu", non_blocking=True) for b in self._values]

    def prefetch(self) -> None:
        self._keys = [b.to(self.device, non_blocking=True) for b in self._keys]
        self._values = [b.to(self.device, non_blocking=True) for b in self._values]

    # -- accounting ------------------------------------------------------------------------------------
    @property
    def head_lengths(self) -> list[int]:
        """Tokens each KV head holds now."""
        return list(self._used)

    @property
    def nbytes(self) -> int:
        """Bytes the layer's buffers allocate (keys and values, room included)."""
        return sum(b.numel() * b.element_size() for b in (*self._keys, *self._values))


def _room(buffer: torch.Tensor, used: int, extra: int) -> torch.Tensor:
    """`buffer` with room for `extra` more rows after its first `used` (the same tensor when it has the room)."""
    if used + extra <= buffer.shape[0]:
        return buffer
    grown = buffer.new_empty(used + extra + max(MIN_GROWTH, used // 8), buffer.shape[1])
    grown[:used] = buffer[:used]
    return grown


def ragged_attention(query: torch.Tensor, key: RaggedKV, value: RaggedKV, *, scaling: float) -> torch.Tensor:
    """Attention of query (1, H, q, D) over a ragged layer: KV head h's query heads see only head h's tokens, the
    q queries being its last q positions (causal, bottom-right aligned). Returns (1, q, H, D), as transformers'
    attention functions do. SDPA on each head group, as the dense path computes it (no logit soft-capping: SDPA
    has none, and a model that needs it runs eager attention, which plans do not use)."""
    _, num_heads, q_len, head_dim = query.shape
    group = num_heads // len(key.heads)
    outputs = []
    for h, (k, v) in enumerate(zip(key.heads, value.heads)):
        k_len = k.shape[0]
        mask = None
        if q_len > 1:
            positions = torch.arange(k_len - q_len, k_len, device=query.device)[:, None]  # (q, 1)
            mask = torch.arange(k_len, device=query.device)[None, :] <= positions  # (q, K_h) bottom-right causal
        keys = k[None, None].expand(1, group, k_len, head_dim)  # (1, G, K_h, D): a view shared by the group
        vals = v[None, None].expand(1, group, k_len, head_dim)
        outputs.append(scaled_dot_product_attention(query[:, h * group:(h + 1) * group], keys, vals, attn_mask=mask,
                                                    scale=scaling))  # (1, G, q, D)
    return torch.cat(outputs, dim=1).transpose(1, 2).contiguous()  # (1, q, H, D)
