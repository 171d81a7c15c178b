"""What a person sees after calibrate: a per-layer summary table and a PNG heatmap of the signals by layer."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from rich.table import Table

from polykv_search.calibrate.profile import Profile
from polykv_search.io import write_atomic

TABLE_SIGNALS = {"entropy": "H", "variance": "V", "sparsity": "sparse", "shift": "shift", "sink_mass": "sink",
                 "recent_mass": "recent"}


def _reference_budget(profile: Profile) -> int:
    """The grid budget nearest to 10% of the median context: where policies differ most visibly."""
    ctx = profile.arrays["context_tokens"].float().median().item()
    target = max(16.0, 0.1 * ctx)
    return min(profile.budgets, key=lambda b: abs(math.log(b) - math.log(target)))


def summary_table(profile: Profile) -> Table:
    info = profile.model
    budget = _reference_budget(profile)
    g = profile.budgets.index(budget)
    costs = profile.layer_costs("mass_lost")[:, :, g]  # (L, P)
    signals = profile.layer_signals()
    table = Table(title=f"{info.model_id}: per-layer signals, {profile.num_samples} samples",
                  caption=f"H entropy (nats), V window variance (CAKE), sparse = share of tokens holding 90% of "
                          f"decoding attention, shift = prefill-to-decoding total variation; best/worst policy = "
                          f"least/most decoding attention mass lost at {budget} tokens", show_lines=False)
    table.add_column("layer", justify="right")
    table.add_column("type")
    for short in TABLE_SIGNALS.values():
        table.add_column(short, justify="right")
    table.add_column(f"best@{budget}")
    table.add_column("lost", justify="right")
    table.add_column("worst")
    for layer in range(info.num_layers):
        kind = "slide" if info.layer_types[layer] == "sliding_attention" else "full"
        row = [str(layer), kind]
        row += [_fmt(signals[name][layer].item()) for name in TABLE_SIGNALS]
        if torch.isnan(costs[layer]).all():
            row += ["(fixed)", "", ""]
        else:
            best, worst = int(costs[layer].argmin()), int(costs[layer].argmax())
            row += [profile.policies[best], f"{costs[layer, best].item():.3f}", profile.policies[worst]]
        table.add_row(*row)
    return table


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"


def signal_heatmap(profile: Profile, path: str | Path) -> Path:
    """Signals (rows, each scaled to [0, 1]) by layer (columns); sliding-window layers are blank."""
    import matplotlib

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
