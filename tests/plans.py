"""Plans built from per-layer lists, as the tests write them: policies[l] and budgets[l] for every model layer."""

from __future__ import annotations

from collections.abc import Sequence

from polykv_search.plan import LayerPlan, Plan, SearchInfo

TEST = SearchInfo(solver="test", status="hand-made")


def plan_of(info, policies: Sequence[str | None], budgets: Sequence[int | None], *, average: float | None = None,
            search: SearchInfo = TEST) -> Plan:
    """A plan with `policies[l]` keeping `budgets[l]` tokens in each compressible layer l (None: the whole context);
    entries at sliding-window layers are ignored."""
    layers = [LayerPlan.full(i) if policies[i] is None else LayerPlan.of(i, policies[i], budgets[i])
              for i in info.compressible_layers]
    return Plan.build(info, layers=layers, average_budget=average, search=search)


def uniform_of(info, policy: str, budget: int) -> Plan:
    """`policy` keeping `budget` tokens in every compressible layer."""
    n = info.num_layers
    return plan_of(info, [policy] * n, [budget] * n, average=budget)
