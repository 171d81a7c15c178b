"""Model loading: Hugging Face ids and folders, GGUF files (converted once to safetensors), embedded aliases."""

from polykv_search.models.loading import (
    LoadedModel,
    ModelInfo,
    load_model,
    resolve_device,
    resolve_dtype,
)

__all__ = ["LoadedModel", "ModelInfo", "load_model", "resolve_device", "resolve_dtype"]
