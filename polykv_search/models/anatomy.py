"""Model anatomy: where a causal LM keeps its decoder layers, rotary embedding and attention soft cap.

Text-only models and the language model of a multimodal one are found the same way; every stage that hooks
attention modules goes through here, so a new layout is taught in one place.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch


def logit_softcap(module: torch.nn.Module) -> float | None:
    """The attention-logit soft cap of an attention module (Gemma-2 style), or None."""
    return getattr(module, "attn_logit_softcapping", None) or getattr(module.config, "attn_logit_softcapping", None)


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder layers of a causal LM (text-only or the language model of a multimodal one)."""
    inner = model.model
    inner = getattr(inner, "language_model", inner)
    return inner.layers


def rotary_owner(model: torch.nn.Module) -> torch.nn.Module:
    """The module holding the model's shared rotary embedding (`rotary_emb`)."""
    inner = model.model
    return getattr(inner, "language_model", inner)


class TypedRotary(torch.nn.Module):
    """Calls a shared rotary module with a fixed layer type (the shared module is referenced, not owned)."""

    def __init__(self, rotary: torch.nn.Module, layer_type: str) -> None:
        super().__init__()
        object.__setattr__(self, "_rotary", rotary)  # not a child: no duplicate buffers in state_dict
        self.layer_type = layer_type

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor):
        return self._rotary(x, position_ids, layer_type=self.layer_type)


def rotary_for_layer(owner: torch.nn.Module, layer_type: str) -> torch.nn.Module:
    """The rotary embedding a layer's module should expose as `rotary_emb` (kvpress's ExpectedAttention calls it).

    Gemma-3 keeps one rotary module for all layer types and needs the type as an argument; kvpress calls it
    with two arguments only, so such a model gets a wrapper bound to the layer's type.
    """
    rotary = owner.rotary_emb
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        return TypedRotary(rotary, layer_type)
    return rotary


@contextmanager
def layer_rotaries(model: torch.nn.Module, layers: Sequence[int]) -> Iterator[None]:
    """Give the attention module of each of `layers` the `rotary_emb` kvpress's scorers call (ExpectedAttention
    re-rotates queries with it), bound to the layer's type; on exit each module's own attribute is restored (or
    removed, when it had none)."""
    decoder = decoder_layers(model)
    owner = rotary_owner(model)
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    types = list(getattr(config, "layer_types", None) or ["full_attention"] * len(decoder))
    saved = []
    try:
        for idx in layers:
            module = decoder[idx].self_attn
            saved.append((module, module.__dict__.get("rotary_emb", _ABSENT), module._modules.get("rotary_emb", _ABSENT)))
            module.rotary_emb = rotary_for_layer(owner, types[idx])
        yield
    finally:
        restore_rotaries(saved)


def saved_rotaries(model: torch.nn.Module) -> list[tuple[torch.nn.Module, object, object]]:
    """Every attention module's own `rotary_emb` (as attribute and as child module), to restore later."""
    return [(layer.self_attn, layer.self_attn.__dict__.get("rotary_emb", _ABSENT),
             layer.self_attn._modules.get("rotary_emb", _ABSENT)) for layer in decoder_layers(model)]


def restore_rotaries(saved: Sequence[tuple[torch.nn.Module, object, object]]) -> None:
    """Put back what `saved_rotaries` (or `layer_rotaries`) recorded: the attribute, the child, or nothing."""
    for module, attribute, child in saved:
        module.__dict__.pop("rotary_emb", None)
        module._modules.pop("rotary_emb", None)
        if child is not _ABSENT:
            module._modules["rotary_emb"] = child
        elif attribute is not _ABSENT:
            module.__dict__["rotary_emb"] = attribute


_ABSENT = object()  # marks "the module had no rotary_emb"
