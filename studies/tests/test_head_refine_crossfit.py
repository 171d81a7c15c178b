"""studies/head_refine_crossfit.py: one-level moves per KV head (the DP that picks
them is `trust_region`, tested in tests/optimization/test_refine.py)."""

import importlib.util
import itertools
from pathlib import Path

from polykv_search.plan import HeadPlan, LayerPlan, Plan, SearchInfo

STUDIES = Path(__file__).parents[1]
spec = importlib.util.spec_from_file_location("head_refine_crossfit", STUDIES / "head_refine_crossfit.py")
refine_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(refine_module)

GRID = [16, 64, 256]


def _plan(info, budgets):
    """A per-head plan: StreamingLLM in every head, the budgets of `budgets` in turn over layers and heads."""
    heads, it = info.num_kv_heads, iter(itertools.cycle(budgets))
    layers = [LayerPlan(index=i, policy=None, heads=tuple(HeadPlan.of("streaming", next(it)) for _ in range(heads)))
              for i in info.compressible_layers]
    return Plan.build(info, layers=layers, search=SearchInfo(solver="test", status="test", objective=0.0))


def test_moves_go_one_grid_level_up_or_down_and_keep_the_policy(tiny_llama):
    plan = _plan(tiny_llama.info, [16, 64, 256])
    moves = refine_module.one_level_moves(plan, GRID)
    found = {}
    for layer, h, head, tokens in moves:
        old = plan.layers[layer].heads[h]
        assert head.policy == old.policy and head.budget - old.budget == tokens
        found.setdefault(old.budget, set()).add(head.budget)
    assert found == {16: {64}, 64: {16, 256}, 256: {64}}  # the top level has no move up, the lowest none down
    moved = refine_module.with_moves(plan, moves[:1], tiny_llama.info)
    layer, h, head, _ = moves[0]
    assert moved.layers[layer].heads[h] == head
    assert moved.constraint.average_budget == plan.constraint.average_budget
    assert sum(1 for a, b in zip(moved.layers, plan.layers) if a != b) == 1

