"""Model geometries and calibration profiles built in code for the plan tests (no model is loaded)."""

from __future__ import annotations

import torch

from polykv_search.calibration.profile import PROFILE_FORMAT, PROFILE_VERSION, Profile
from polykv_search.models import ModelInfo

SLIDING, FULL = "sliding_attention", "full_attention"


def llama_like(num_layers: int = 30, *, model_id: str = "smollm2-135m", revision: str = "a" * 64) -> ModelInfo:
    """SmolLM2-135M's geometry: every layer full attention."""
    return ModelInfo(model_id=model_id, revision=revision, num_layers=num_layers,
                     layer_types=[FULL] * num_layers, num_heads=9, num_kv_heads=3, head_dim=64, max_context=8192)


def gemma_like() -> ModelInfo:
    """Gemma-3-270M's geometry: 18 layers, five sliding-window layers to one full layer."""
    return ModelInfo(model_id="gemma3-270m", revision="b" * 64, num_layers=18,
                     layer_types=([SLIDING] * 5 + [FULL]) * 3, num_heads=4, num_kv_heads=1, head_dim=256,
                     max_context=32768, sliding_window=512)


def with_layer_types(types: list[str], *, model_id: str = "mixed") -> ModelInfo:
    return ModelInfo(model_id=model_id, revision="local", num_layers=len(types), layer_types=list(types),
                     num_heads=4, num_kv_heads=2, head_dim=16, max_context=4096)


def make_profile(info: ModelInfo, *, entropy: list[float], variance: list[float], samples: int = 2,
                 policies: tuple[str, ...] = ("snapkv", "streaming"), budgets: tuple[int, ...] = (16, 64)) -> Profile:
    """A profile whose per-layer mean entropy and variance are the given values (NaN on sliding layers)."""
    n, layers, heads = samples, info.num_layers, info.num_kv_heads
    cost_shape = (n, layers, heads, len(policies), len(budgets))

    def signal(values: list[float]) -> torch.Tensor:
        per_layer = torch.tensor(values, dtype=torch.float32)  # (L,)
        for layer, kind in enumerate(info.layer_types):
            if kind == SLIDING:
                per_layer[layer] = float("nan")
        return per_layer[None, :, None].expand(n, layers, heads).clone()  # (N, L, H_kv)

    header = {
        "format": PROFILE_FORMAT,
        "format_version": PROFILE_VERSION,
        "model": info.to_dict(),
        "policies": [{"name": name} for name in policies],
        "budgets": list(budgets),
        "signals": ["entropy", "variance"],
        "samples": [{"id": f"s{i}", "context_tokens": 1000} for i in range(n)],
    }
    arrays = {
        "mass_lost": torch.rand(cost_shape),
        "out_err": torch.rand(cost_shape),
        "context_tokens": torch.full((n,), 1000, dtype=torch.int64),
        "signal.entropy": signal(entropy),
        "signal.variance": signal(variance),
    }
    return Profile(header=header, arrays=arrays)
