"""A PNG heatmap of a profile's signals by layer (written next to the profile)."""

from __future__ import annotations

from pathlib import Path

import torch

from polykv_search.calibration.profile import Profile
from polykv_search.io import write_atomic


def signal_heatmap(profile: Profile, path: str | Path) -> Path:
    """Signals (rows, each scaled to [0, 1]) by layer (columns); sliding-window layers are blank."""
    import matplotlib  # imported here: a second to load, and only the figure needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    signals = profile.layer_signals()
    names = list(signals)
    grid = torch.stack([signals[n] for n in names])  # (S, L)
    lo = torch.nan_to_num(grid, nan=float("inf")).amin(dim=1, keepdim=True)
    hi = torch.nan_to_num(grid, nan=float("-inf")).amax(dim=1, keepdim=True)
    scaled = (grid - lo) / (hi - lo).clamp_min(1e-12)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * grid.shape[1] + 2), 0.45 * len(names) + 1.6))
    image = ax.imshow(scaled.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_yticks(range(len(names)), [f"{n} [{lo[i, 0]:.2g}, {hi[i, 0]:.2g}]" for i, n in enumerate(names)])
    ax.set_xticks(range(grid.shape[1]))
    ax.set_xticklabels(range(grid.shape[1]), fontsize=7)
    ax.set_xlabel("layer")
    ax.set_title(f"{profile.model.model_id}: layer signals (each row scaled to its range)")
    fig.colorbar(image, ax=ax, fraction=0.025)
    fig.tight_layout()
    path = Path(path)
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
