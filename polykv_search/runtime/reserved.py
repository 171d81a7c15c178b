"""A cache layer with room reserved for the tokens still to come, so decoding writes in place.

transformers' DynamicLayer concatenates on every update: each decoding step allocates a new (B, H_kv, K, D)
tensor per layer for keys and for values and copies the whole cache into it. On CPU those fresh allocations
are page faults, and with a batch of methods or a long full cache they dominated greedy decoding (torch.cat was
45% of the batched decoding time). A ReservedLayer copies the cache once into a buffer with `room` more slots
and answers with views; beyond its room it concatenates like DynamicLayer.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer


class ReservedLayer(DynamicLayer):
    """A full-attention cache layer holding `keys`/`values` (B, H_kv, K, D) with `room` free slots after them."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, room: int) -> None:
        super().__init__()
        batch, heads, length, _ = keys.shape
        self._keys = keys.new_empty(batch, heads, length + room, keys.shape[-1])
        self._values = values.new_empty(batch, heads, length + room, values.shape[-1])
        self._keys[:, :, :length] = keys
        self._values[:, :, :length] = values
        self.keys, self.values = self._keys[:, :, :length], self._values[:, :, :length]
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        start = self.keys.shape[-2]
        stop = start + key_states.shape[-2]
        if stop > self._keys.shape[-2] or key_states.shape[0] != self._keys.shape[0]:
            return super().update(key_states, value_states, cache_kwargs)  # out of room: concatenate
        self._keys[:, :, start:stop] = key_states
        self._values[:, :, start:stop] = value_states
        self.keys, self.values = self._keys[:, :, :stop], self._values[:, :, :stop]
        return self.keys, self.values
