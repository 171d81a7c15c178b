"""benchmarks/head_refine_crossfit.py: one-level moves per KV head, and the DP that picks them within its limits."""

import importlib.util
import itertools
from pathlib import Path

from polykv_search.plan import HeadPlan, LayerPlan, Plan, SearchInfo

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"
spec = importlib.util.spec_from_file_location("head_refine_crossfit", BENCHMARKS / "head_refine_crossfit.py")
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


def test_the_dp_finds_the_best_moves_within_the_limits():
    # four heads; moves (tokens, predicted change): raising head 0 gains most but costs tokens someone must give
    moves = [(0, 0, None, 48), (0, 1, None, -48), (0, 1, None, 192), (0, 2, None, -48), (0, 3, None, -192)]
    gains = [-1.0, 0.3, -0.4, 0.6, 0.2]

    def brute(most):
        best = (0.0, ())
        for r in range(1, most + 1):
            for picked in itertools.combinations(range(len(moves)), r):
                heads = [moves[i][1] for i in picked]
                if len(set(heads)) < len(heads) or sum(moves[i][3] for i in picked) > 0:
                    continue
                cost = sum(gains[i] for i in picked)
                if cost < best[0]:
                    best = (cost, picked)
        return best

    for most in (1, 2, 3, 4):
        chosen, cost = refine_module.best_moves(moves, gains, most)
        expected_cost, expected = brute(most)
        assert len(chosen) <= most and sum(m[3] for m in chosen) <= 0
        assert abs(cost - expected_cost) < 1e-12 and abs(sum(gains[moves.index(m)] for m in chosen) - cost) < 1e-12
        assert sorted(moves.index(m) for m in chosen) == sorted(expected)
    assert refine_module.best_moves(moves, gains, 1) == ([], 0.0)  # no single move pays for itself
    chosen, cost = refine_module.best_moves(moves, gains, 2)
    assert [moves.index(m) for m in chosen] == [0, 4] and abs(cost + 0.8) < 1e-12  # head 3's tokens pay for head 0
