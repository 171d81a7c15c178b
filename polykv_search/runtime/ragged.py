"""A cache layer holding a different number of tokens in each KV head and batch row: a per-head plan's memory, saved.

A transformers cache layer is dense, (B, H_kv, T, D): every head of a layer would be padded to the layer's longest
head (1.7-2.4x the entries of SmolLM2's per-head plans), and every row of a batch to its longest prompt. A
RaggedLayer keeps the layer's tokens in one flat buffer per keys and values, (capacity, D), as variable-length
attention kernels take them: segment i = (KV head i // B, row i % B) holds exactly that head's kept tokens of that
row (a row whose prompt is shorter than a head's budget keeps its whole prompt, and no padding). Decoding appends
each new token to every segment in one scatter; a full segment makes the buffer grow, every segment getting room
for a sixteenth of its length more (at least 16 slots), so the cumulative offsets (`starts`) change only then.

Attention reads it through `ragged_attention`: on CUDA in half precision, one call of a varlen kernel over every
segment (flash-attn's when it is installed and takes `seqused_k`, else torch's `varlen_attn`); elsewhere SDPA per KV
head over a (B, length, D) view of its rows when they hold as many tokens (the usual case), per segment otherwise.

kvpress's pipeline removes an answer from the cache by slicing every layer's `keys`/`values` to a length; a
RaggedLayer's length is its longest compressed segment plus the tokens appended since, and the same slice drops the
appended tokens from every segment.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from itertools import accumulate
from typing import Any

import torch
from torch.nn.functional import scaled_dot_product_attention
from transformers.cache_utils import CacheLayerMixin

logger = logging.getLogger(__name__)

MIN_GROWTH = 16  # slots added to a full segment at least
GROWTH_DIVISOR = 16  # and a sixteenth of its length at least: the room decoding keeps is at most about 1/16
VARLEN_DTYPES = (torch.float16, torch.bfloat16)  # what the flash kernels take


@dataclass(frozen=True)
class RaggedKV:
    """One layer's keys or values: a flat (capacity, D) buffer of B x H_kv segments, and the layer's length."""

    data: torch.Tensor  # (capacity, D); segment i (KV head i // batch, row i % batch) is data[starts[i]:][:used[i]]
    starts: tuple[int, ...]  # S + 1 offsets of the segments' slots
    used: tuple[int, ...]  # tokens each segment holds
    batch: int
    length: int  # the layer's sequence length: its longest compressed segment plus the tokens appended since
    appended: int = 0  # tokens appended to every segment since compression (the only ones a cut may remove)
    index: tuple[torch.Tensor, torch.Tensor] | None = None  # (starts, used) as int32 on a GPU, for varlen kernels

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def num_heads(self) -> int:
        return len(self.used) // self.batch

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """The dense shape this would have, (B, H_kv, length, D): what code that only reads sizes expects."""
        return (self.batch, self.num_heads, self.length, self.data.shape[-1])

    def segment(self, head: int, row: int = 0) -> torch.Tensor:
        """The (used, D) tokens KV head `head` holds for batch row `row` (a view)."""
        i = head * self.batch + row
        return self.data[self.starts[i]:self.starts[i] + self.used[i]]

    @property
    def heads(self) -> tuple[torch.Tensor, ...]:
        """Batch row 0's tokens of every KV head (the whole layer at batch size 1)."""
        return tuple(self.segment(h) for h in range(self.num_heads))

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
        return RaggedKV(data=self.data, starts=self.starts, used=tuple(n - drop for n in self.used), batch=self.batch,
                        length=stop, appended=self.appended - drop)


class RaggedLayer(CacheLayerMixin):
    """A full-attention cache layer whose KV heads (and batch rows) hold different numbers of tokens."""

    is_sliding = False

    def __init__(self, keys: Sequence[Sequence[torch.Tensor]], values: Sequence[Sequence[torch.Tensor]]) -> None:
        """keys[b][h], values[b][h]: (length, D), the tokens KV head h keeps for batch row b, in cache order."""
        super().__init__()
        if len(keys) != len(values) or not keys or not keys[0] or any(
                len(row) != len(keys[0]) for row in (*keys, *values)):
            raise ValueError("give one keys and one values tensor per batch row and KV head")
        self._batch, self._heads = len(keys), len(keys[0])
        order = [(b, h) for h in range(self._heads) for b in range(self._batch)]  # segment i: head-major
        self._used = [len(keys[b][h]) for b, h in order]
        self._starts = [0, *accumulate(self._used)]  # no room yet: exactly the kept tokens
        self._keys = torch.cat([keys[b][h] for b, h in order]).contiguous()
        self._values = torch.cat([values[b][h] for b, h in order]).contiguous()
        self._appended = 0  # tokens added to every segment since compression
        self._base = max(self._used)
        self.dtype, self.device = self._keys.dtype, self._keys.device
        self._index: tuple[torch.Tensor, torch.Tensor] | None = None
        self.is_initialized = True

    @classmethod
    def from_dense(cls, keys: torch.Tensor, values: torch.Tensor,
                   kept: Sequence[Sequence[torch.Tensor]]) -> RaggedLayer:
        """The layer keeping, for batch row b and KV head h, the positions kept[b][h] of the dense (B, H_kv, T, D)
        keys and values."""
        if len(kept) != keys.shape[0]:
            raise ValueError(f"kept positions for {len(kept)} rows; the keys hold {keys.shape[0]}")
        return cls([[keys[b, h, idx.to(keys.device)] for h, idx in enumerate(row)] for b, row in enumerate(kept)],
                   [[values[b, h, idx.to(values.device)] for h, idx in enumerate(row)] for b, row in enumerate(kept)])

    # -- what attention reads --------------------------------------------------------------------
    def _view(self, data: torch.Tensor) -> RaggedKV:
        return RaggedKV(data=data, starts=tuple(self._starts), used=tuple(self._used), batch=self._batch,
                        length=self.get_seq_length(), appended=self._appended, index=self._device_index())

    @property
    def keys(self) -> RaggedKV:
        return self._view(self._keys)

    @keys.setter
    def keys(self, value: Any) -> None:
        self._cut(value)

    @property
    def values(self) -> RaggedKV:
        return self._view(self._values)

    @values.setter
    def values(self, value: Any) -> None:
        self._cut(value)

    def _device_index(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The offsets and lengths as int32 on the GPU, kept in step with the lists (None on a CPU)."""
        if self._keys.device.type != "cuda":
            return None
        if self._index is None:
            self._index = (torch.tensor(self._starts, dtype=torch.int32, device=self._keys.device),
                           torch.tensor(self._used, dtype=torch.int32, device=self._keys.device))
        return self._index

    def _cut(self, value: Any) -> None:
        """Accept a cut of this layer (RaggedKV from `keys[:, :, :n]`); anything else is refused."""
        if value is None and not hasattr(self, "_used"):
            return  # CacheLayerMixin.__init__ sets keys/values to None before the buffers exist
        if not isinstance(value, RaggedKV) or len(value.used) != len(self._used):
            raise TypeError("a ragged cache layer's keys and values can only be cut, not replaced")
        drop = self.get_seq_length() - value.length
        if drop > 0:
            self._used = [n - drop for n in self._used]
            self._appended -= drop
            if self._index is not None:
                self._index[1].sub_(drop)

    # -- transformers' cache layer interface ---------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Built from its kept tokens: nothing to do lazily."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[RaggedKV, RaggedKV]:
        """Append the new (B, H_kv, q, D) keys and values to every segment; return the whole layer."""
        expected = (self._batch, self._heads)
        if tuple(key_states.shape[:2]) != expected or key_states.shape[-1] != self._keys.shape[-1]:
            raise ValueError(f"this ragged cache layer holds {self._batch} rows of {self._heads} KV heads of size "
                             f"{self._keys.shape[-1]}; got states {tuple(key_states.shape)}: a cache serves the one "
                             "model and batch that filled it")
        q = key_states.shape[2]
        if any(n + q > stop - start for n, start, stop in zip(self._used, self._starts, self._starts[1:])):
            self._grow(q)
        if self._index is not None:  # on a GPU: from the int32 copies, without a transfer per step
            slots = (self._index[0][:-1] + self._index[1]).long()
        else:
            slots = torch.tensor([start + n for start, n in zip(self._starts, self._used)], device=self._keys.device)
        dest = (slots[:, None] + torch.arange(q, device=slots.device)).reshape(-1)  # (S*q,), segment order
        width = self._keys.shape[-1]
        self._keys.index_copy_(0, dest, key_states.transpose(0, 1).reshape(-1, width).to(self._keys.dtype))
        self._values.index_copy_(0, dest, value_states.transpose(0, 1).reshape(-1, width).to(self._values.dtype))
        self._used = [n + q for n in self._used]
        self._appended += q
        if self._index is not None:
            self._index[1].add_(q)
        return self.keys, self.values

    def _grow(self, q: int) -> None:
        """Re-lay the buffers with room after every segment: q slots, and a sixteenth of its length (>= 16) more.
        One gather of every held token into the new layout (what a dense cache's concatenation copies each step)."""
        used = torch.tensor(self._used)
        capacity = used + q + torch.clamp(used // GROWTH_DIVISOR, min=MIN_GROWTH)
        starts = torch.cat([torch.zeros(1, dtype=torch.long), capacity.cumsum(0)])
        segment = torch.repeat_interleave(torch.arange(len(self._used)), used)  # each held token's segment
        within = torch.arange(int(used.sum())) - torch.repeat_interleave(
            torch.cat([torch.zeros(1, dtype=torch.long), used.cumsum(0)[:-1]]), used)
        old = (torch.tensor(self._starts)[segment] + within).to(self._keys.device)
        new = (starts[segment] + within).to(self._keys.device)
        grown_k = self._keys.new_empty(int(starts[-1]), self._keys.shape[-1])
        grown_v = self._values.new_empty(int(starts[-1]), self._values.shape[-1])
        grown_k.index_copy_(0, new, self._keys.index_select(0, old))
        grown_v.index_copy_(0, new, self._values.index_select(0, old))
        self._keys, self._values, self._starts, self._index = grown_k, grown_v, starts.tolist(), None

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
        raise NotImplementedError("a ragged cache layer's rows hold different lengths; beam search is not supported")

    def offload(self) -> None:
        self._keys, self._values = self._keys.to("cpu", non_blocking=True), self._values.to("cpu", non_blocking=True)
        self._index = None

    def prefetch(self) -> None:
        self._keys = self._keys.to(self.device, non_blocking=True)
        self._values = self._values.to(self.device, non_blocking=True)

    # -- accounting ------------------------------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self._batch

    @property
    def head_lengths(self) -> list[int]:
        """Tokens each KV head holds now (batch row 0; `lengths` for every row)."""
        return [self._used[h * self._batch] for h in range(self._heads)]

    @property
    def lengths(self) -> list[list[int]]:
        """Tokens each (batch row, KV head) holds now: lengths[b][h]."""
        return [[self._used[h * self._batch + b] for h in range(self._heads)] for b in range(self._batch)]

    @property
    def nbytes(self) -> int:
        """Bytes the layer's buffers allocate (keys and values, room included)."""
        return sum(b.numel() * b.element_size() for b in (self._keys, self._values))


def ragged_attention(query: torch.Tensor, key: RaggedKV, value: RaggedKV, *, scaling: float) -> torch.Tensor:
    """Attention of query (B, H, q, D) over a ragged layer: KV head h's query heads of row b see only segment (h, b),
    the q queries being its last q positions (causal, bottom-right aligned). Returns (B, q, H, D), as transformers'
    attention functions do. A varlen kernel on CUDA in half precision, SDPA per KV head elsewhere (no logit
    soft-capping: neither has it, and a model that needs it runs eager attention, which plans do not use)."""
    kernel = varlen_kernel(query)
    if kernel is not None and key.index is not None:
        return varlen_attention(kernel, query, key, value, scaling)
    return grouped_sdpa(query, key, value, scaling=scaling)


def grouped_sdpa(query: torch.Tensor, key: RaggedKV, value: RaggedKV, *, scaling: float) -> torch.Tensor:
    """`ragged_attention` with SDPA: per KV head, one call over a (B, length, D) view of its rows where they hold as
    many tokens and sit at equal strides (after compression of equal prompts, always), one call per row otherwise."""
    batch, num_heads, q_len, head_dim = query.shape
    group = num_heads // key.num_heads
    out = query.new_empty(batch, num_heads, q_len, head_dim)
    for h in range(key.num_heads):
        first = h * batch
        lengths = key.used[first:first + batch]
        gaps = {key.starts[i + 1] - key.starts[i] for i in range(first, first + batch)}
        queries = query[:, h * group:(h + 1) * group]  # (B, G, q, D)
        if len(set(lengths)) == 1 and len(gaps) == 1:
            n, stride = lengths[0], gaps.pop()
            rows = slice(key.starts[first], key.starts[first] + batch * stride)
            k = key.data[rows].view(batch, stride, head_dim)[:, None, :n].expand(batch, group, n, head_dim)
            v = value.data[rows].view(batch, stride, head_dim)[:, None, :n].expand(batch, group, n, head_dim)
            out[:, h * group:(h + 1) * group] = scaled_dot_product_attention(
                queries, k, v, attn_mask=_causal(q_len, n, query.device), scale=scaling)
            continue
        for b in range(batch):
            k, v = key.segment(h, b), value.segment(h, b)
            n = k.shape[0]
            out[b:b + 1, h * group:(h + 1) * group] = scaled_dot_product_attention(
                queries[b:b + 1], k[None, None].expand(1, group, n, head_dim),
                v[None, None].expand(1, group, n, head_dim), attn_mask=_causal(q_len, n, query.device), scale=scaling)
    return out.transpose(1, 2).contiguous()


def _causal(q_len: int, k_len: int, device: torch.device) -> torch.Tensor | None:
    """The (q, K) bottom-right causal mask of q new queries over K keys (None for one query: it sees them all)."""
    if q_len == 1:
        return None
    positions = torch.arange(k_len - q_len, k_len, device=device)[:, None]  # (q, 1)
    return torch.arange(k_len, device=device)[None, :] <= positions


def varlen_attention(kernel: Callable, query: torch.Tensor, key: RaggedKV, value: RaggedKV,
                      scaling: float) -> torch.Tensor:
    """Every segment as one sequence of a varlen kernel: its G query heads and q queries against its own tokens
    (one KV head), the slots after a segment's `used` skipped through `seqused_k`."""
    batch, num_heads, q_len, head_dim = query.shape
    num_kv = key.num_heads
    group = num_heads // num_kv
    segments = num_kv * batch
    q = query.view(batch, num_kv, group, q_len, head_dim).permute(1, 0, 3, 2, 4).reshape(segments * q_len, group,
                                                                                        head_dim)
    cu_q = torch.arange(0, (segments + 1) * q_len, q_len, dtype=torch.int32, device=query.device)
    starts, used = key.index
    out = kernel(q, key.data[:, None], value.data[:, None], cu_q, starts, used, q_len, max(key.used), scaling)
    out = out.view(num_kv, batch, q_len, group, head_dim).permute(1, 2, 0, 3, 4)  # (B, q, H_kv, G, D)
    return out.reshape(batch, q_len, num_heads, head_dim).contiguous()


def varlen_kernel(query: torch.Tensor) -> Callable | None:
    """The varlen kernel for this query's device and dtype, or None (then SDPA per head group)."""
    if query.device.type != "cuda" or query.dtype not in VARLEN_DTYPES:
        return None
    return _cuda_varlen()


@cache
def _cuda_varlen() -> Callable | None:
    """flash-attn's varlen function if installed and it takes `seqused_k` (flash-attn 3), else torch's varlen_attn,
    else None; said once. The kernels are imported here: optional, and looked up only on a GPU."""
    try:
        from flash_attn import flash_attn_varlen_func  # type: ignore[import-not-found]
        if "seqused_k" in inspect.signature(flash_attn_varlen_func).parameters:
            logger.info("ragged attention: flash-attn's flash_attn_varlen_func")

            def flash(q, k, v, cu_q, starts, used, max_q, max_k, scale):
                return flash_attn_varlen_func(q, k, v, cu_q, starts, max_q, max_k, seqused_k=used,
                                              softmax_scale=scale, causal=max_q > 1)
            return flash
    except ImportError:
        pass
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        logger.info("ragged attention: no varlen kernel in this torch; SDPA per KV head")
        return None
    logger.info("ragged attention: torch.nn.attention.varlen.varlen_attn")

    def torch_varlen(q, k, v, cu_q, starts, used, max_q, max_k, scale):
        return varlen_attn(q, k, v, cu_q, starts, max_q, max_k, scale=scale, enable_gqa=True, seqused_k=used,
                           window_size=(-1, 0) if max_q > 1 else (-1, -1))
    return torch_varlen
