"""TensorRT-LLM window shapes: the engine window's total, every window above the sinks, in the shape's direction."""

import pytest

from polykv_search.errors import ConfigError
from polykv_search.optimization.targets import N_SINK
from polykv_search.optimization.window_shapes import WINDOW_SHAPES, shape_ladder, shape_ladders, shape_windows
from polykv_search.plan import budget_total
from tests.conftest import tiny_loaded


@pytest.mark.parametrize("budget", [5, 16, 64, 100.5])
@pytest.mark.parametrize("shape", WINDOW_SHAPES)
def test_a_shape_spends_the_engine_windows_total_above_the_sinks(shape, budget):
    windows = shape_windows(shape, 30, budget)
    assert len(windows) == 30 and sum(windows) == budget_total(budget, 30)
    assert min(windows) > N_SINK


def test_each_shape_leans_the_way_its_name_says():
    pyramid, inverted = shape_windows("pyramid", 30, 64), shape_windows("inverted", 30, 64)
    assert pyramid == sorted(pyramid, reverse=True) and pyramid[0] > 3 * pyramid[-1]
    assert inverted == sorted(inverted) and inverted[-1] > 3 * inverted[0]
    bottom, top = shape_windows("bottom", 30, 64), shape_windows("top", 30, 64)
    assert bottom[:7] == [150] * 7 and set(bottom[7:]) <= {37, 38}  # a quarter of the layers at 4x the rest
    assert top[-7:] == [150] * 7


def test_a_ladder_is_one_streaming_window_per_layer_at_each_budget():
    info = tiny_loaded("llama").info
    ladder = shape_ladder(info, "inverted", [12, 16])
    assert ladder.budgets == [12, 16]
    for rung in ladder.plans:
        assert not rung.per_head and {layer.policy for layer in rung.layers} == {"streaming"}
        assert [layer.budget for layer in rung.layers] == shape_windows("inverted", len(info.compressible_layers),
                                                                        rung.average_budget)
        assert rung.search.solver == "shape" and "inverted" in rung.search.notes
    assert [name for name, _ in shape_ladders(info, [12])] == [f"{s} windows" for s in WINDOW_SHAPES]


def test_an_unknown_shape_or_a_budget_below_the_sinks_is_refused():
    with pytest.raises(ConfigError, match="not one of pyramid, inverted, bottom, top"):
        shape_windows("wedge", 30, 64)
    with pytest.raises(ConfigError):
        shape_windows("inverted", 30, N_SINK)  # every layer must keep more than the sinks
