"""Model loading (Hugging Face ids and folders, GGUF files converted once to safetensors, embedded aliases), what
a plan or profile records about a model, and where a model keeps its layers."""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from polykv_search.models.devices import DEFAULT_DEVICE, DEVICES, describe_device, resolve_device
from polykv_search.models.embedded import DEFAULT_MODEL, EMBEDDED
from polykv_search.models.info import ModelInfo, model_info, model_slug, same_model

# loading imports torch (a second): the command line's --help and plan checks need only the names above
_LAZY = {"LoadedModel", "LoadedTokenizer", "ModelSpec", "load_model", "load_tokenizer", "resolve_dtype",
         "resolve_model"}
__all__ = ["DEFAULT_DEVICE", "DEFAULT_MODEL", "DEVICES", "EMBEDDED", "ModelInfo", "describe_device", "model_info",
           "model_slug", "resolve_device", "same_model",
           *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'polykv_search.models' has no attribute {name!r}")
    value = getattr(import_module("polykv_search.models.loading"), name)
    globals()[name] = value
    return value


if TYPE_CHECKING:
    from polykv_search.models.loading import (
        LoadedModel,
        LoadedTokenizer,
        ModelSpec,
        load_model,
        load_tokenizer,
        resolve_dtype,
        resolve_model,
    )
