"""A plan file's allocation drawn by layer: one panel per budget, tokens per layer coloured by policy."""

from __future__ import annotations

from pathlib import Path

from polykv_search.io import write_atomic
from polykv_search.plan import PlanFile


def allocation_png(plan_file: PlanFile, path: str | Path) -> Path:
    """One panel per budget: tokens per layer as bars coloured by policy; sliding-window layers hatched."""
    import matplotlib  # imported here: a second to load, and only the figure needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plans = list(plan_file.plans)
    names = sorted({entry.policy for plan in plans for layer in plan.layers for entry in (layer, *(layer.heads or ()))
                    if entry.policy is not None})
    colours = {name: plt.cm.tab10(i % 10) for i, name in enumerate(names)}
    fig, axes = plt.subplots(len(plans), 1, figsize=(max(6.0, 0.3 * plan_file.model.num_layers + 2),
                                                      2.2 * len(plans) + 0.6), squeeze=False)
    for ax, plan in zip(axes[:, 0], plans):
        for entry in plan.layers:
            layer = entry.index
            if entry.heads is not None:  # one thin bar per KV head, side by side within the layer's slot
                width = 0.8 / len(entry.heads)
                for h, head in enumerate(entry.heads):
                    ax.bar(layer - 0.4 + width * (h + 0.5), head.budget, width=width, color=colours[head.policy])
            elif entry.policy is None:
                ax.bar(layer, 0, color="lightgrey")
                ax.text(layer, 0, "win", ha="center", va="bottom", fontsize=6, rotation=90)
            else:
                ax.bar(layer, entry.budget, color=colours[entry.policy])
        ax.set_ylabel("tokens")
        ax.set_title(f"average {plan.average_budget:g} tokens/layer ({plan.search.solver}, {plan.search.status})",
                     fontsize=9)
    axes[-1, 0].set_xlabel("layer")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[n]) for n in names]
    fig.legend(handles, names, loc="upper right", fontsize=7, ncol=min(len(names), 4))
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    path = Path(path)
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path
