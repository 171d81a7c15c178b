"""Turn solver output into plan files, sign profiles, and draw a plan's allocation by layer."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from polykv_search.io import file_sha256, write_atomic
from polykv_search.models import ModelInfo
from polykv_search.plan import Plan, PlanFile, SearchInfo


def profile_signature(path: str | Path) -> str:
    return file_sha256(path)


def plan_from_choices(info: ModelInfo, *, average_budget: float, policies: Sequence[str | None],
                      budgets: Sequence[int | None], search: SearchInfo) -> Plan:
    return Plan.build(info, average_budget=average_budget, policies=list(policies), budgets=list(budgets),
                      search=search)


def per_layer_choices(num_layers: int, allocation) -> tuple[list[str | None], list[int | None]]:
    """An Allocation's choices as one policy and one budget per model layer (None where nothing is chosen)."""
    policies: list[str | None] = [None] * num_layers
    budgets: list[int | None] = [None] * num_layers
    for choice in allocation.choices:
        policies[choice.layer], budgets[choice.layer] = choice.policy, int(choice.budget)
    return policies, budgets


def plan_from_allocation(info: ModelInfo, allocation, *, average_budget: float, signature: str | None,
                         seed: int | None = None) -> Plan:
    """An exact-solver Allocation (choices per compressible layer) as a Plan with its provenance."""
    policies, budgets = per_layer_choices(info.num_layers, allocation)
    search = SearchInfo(solver=allocation.solver, status=allocation.status, objective=float(allocation.objective),
                        bound=float(allocation.bound), gap=float(allocation.gap), profile_signature=signature,
                        seed=seed, seconds=round(float(allocation.seconds), 4))
    return plan_from_choices(info, average_budget=average_budget, policies=policies, budgets=budgets, search=search)


def allocation_png(plan_file: PlanFile, path: str | Path) -> Path:
    """One panel per budget: tokens per layer as bars coloured by policy; sliding-window layers hatched."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plans = list(plan_file.plans)
    names = sorted({p for plan in plans for p in plan.policies if p is not None})
    colours = {name: plt.cm.tab10(i % 10) for i, name in enumerate(names)}
    fig, axes = plt.subplots(len(plans), 1, figsize=(max(6.0, 0.3 * plan_file.model.num_layers + 2),
                                                      2.2 * len(plans) + 0.6), squeeze=False)
    for ax, plan in zip(axes[:, 0], plans):
        for layer, (policy, budget) in enumerate(zip(plan.policies, plan.budgets)):
            if policy is None:
                ax.bar(layer, 0, color="lightgrey")
                ax.text(layer, 0, "win", ha="center", va="bottom", fontsize=6, rotation=90)
            else:
                ax.bar(layer, budget, color=colours[policy])
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
