"""What a profile or plan must match about a model: its identity and attention geometry (no torch needed)."""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelInfo:
    """What a profile or plan must match: identity and attention geometry of the model."""

    model_id: str
    revision: str  # commit hash, file sha256, or "local"
    num_layers: int
    layer_types: list[str]  # "full_attention" or "sliding_attention" per layer
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_context: int
    sliding_window: int | None = None
    architecture: str = ""
    add_bos: bool = False

    @property
    def compressible_layers(self) -> list[int]:
        """Layers whose cache a plan may shrink; sliding-window layers are fixed by the architecture."""
        return [i for i, kind in enumerate(self.layer_types) if kind != "sliding_attention"]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelInfo:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def model_info(model: Any, *, model_id: str, revision: str = "local", add_bos: bool = False) -> ModelInfo:
    """The ModelInfo of a loaded transformers causal LM (`model_id` and `revision` name it in profiles and plans)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    num_layers = int(config.num_hidden_layers)
    num_heads = int(config.num_attention_heads)
    num_kv_heads = int(getattr(config, "num_key_value_heads", None) or num_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // num_heads)
    layer_types = list(getattr(config, "layer_types", None) or ["full_attention"] * num_layers)
    sliding = getattr(config, "sliding_window", None)
    if sliding is None:
        layer_types = ["full_attention" if t == "sliding_attention" else t for t in layer_types]
    return ModelInfo(
        model_id=model_id,
        revision=revision,
        num_layers=num_layers,
        layer_types=layer_types,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        max_context=int(getattr(config, "max_position_embeddings", 0) or 0),
        sliding_window=int(sliding) if sliding else None,
        architecture=(model.config.architectures or [type(model).__name__])[0],
        add_bos=add_bos,
    )


def model_slug(model: str | Path) -> str:
    """A folder name for a model spec: its alias, file stem or last path part (outputs/<slug>/ by default); never
    a path of its own (a model id of ".." from an edited file stays under outputs/)."""
    name = Path(str(model).rstrip("/")).name
    name = name[:-5] if name.endswith(".gguf") else name
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", name).strip(".")
    return name or "model"


def same_model(spec: str | Path, model_id: str) -> bool:
    """Whether the model spec (alias, .gguf path, folder or hub id) names the model a profile or plan recorded as
    `model_id`, read without loading the model."""
    spec = str(spec)
    if spec == model_id or (spec.endswith(".gguf") and Path(spec).name == model_id):
        return True
    mine, theirs = Path(spec).expanduser(), Path(model_id).expanduser()
    return mine.is_dir() and theirs.is_dir() and mine.resolve() == theirs.resolve()
