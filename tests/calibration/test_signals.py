"""Signals on hand-made attention maps whose answers are known in closed form."""

import math

import pytest
import torch

from polykv_search.calibration.signals import (
    context_distribution,
    decoding_signals,
    entropy,
    group_heads,
    mass_share_for,
    window_signals,
)


def test_entropy_of_uniform_and_one_hot():
    uniform = torch.full((1, 8), 1 / 8)
    one_hot = torch.zeros(1, 8)
    one_hot[0, 3] = 1
    assert entropy(uniform).item() == pytest.approx(math.log(8))
    assert entropy(one_hot).item() == pytest.approx(0.0, abs=1e-6)


def test_mass_share_counts_tokens_holding_ninety_percent():
    rows = torch.tensor([[0.5, 0.3, 0.15, 0.05],  # 0.5+0.3+0.15 = 0.95 -> 3 of 4 tokens
                         [1.0, 0.0, 0.0, 0.0],    # one token
                         [0.25, 0.25, 0.25, 0.25]])  # 0.9 needs 4 tokens
    assert mass_share_for(rows).tolist() == pytest.approx([0.75, 0.25, 1.0])


def test_context_distribution_drops_suffix_and_renormalises():
    attn = torch.tensor([[0.2, 0.2, 0.6]])
    assert context_distribution(attn, 2).tolist() == [[0.5, 0.5]]


def test_window_signals_entropy_and_variance():
    # Two window queries, one head, four context keys: one looks at key 0, one at key 1.
    attn = torch.tensor([[[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0]]])  # (H=1, w=2, T=4)
    sig = window_signals(attn, 4)
    assert sig["entropy"].item() == pytest.approx(math.log(2))  # mean is (0.5, 0.5, 0, 0)
    assert sig["variance"].item() == pytest.approx(0.25 + 0.25)  # var of (1, 0) is 0.25 at keys 0 and 1


def test_decoding_signals_shift_sink_and_recent():
    window_mean = torch.tensor([[0.5, 0.5, 0.0, 0.0]])  # (H=1, T=4)
    same = torch.tensor([[[0.5, 0.5, 0.0, 0.0, 0.0]]])  # (H=1, S=1, K=5): suffix key gets nothing
    moved = torch.tensor([[[0.0, 0.0, 0.25, 0.25, 0.5]]])  # half the mass on the suffix, rest on keys 2-3
    sig_same = decoding_signals(same, window_mean, 4, n_sink=1, recent=2)
    sig_moved = decoding_signals(moved, window_mean, 4, n_sink=1, recent=2)
    assert sig_same["shift"].item() == pytest.approx(0.0)
    assert sig_moved["shift"].item() == pytest.approx(1.0)  # disjoint supports
    assert sig_same["sink_mass"].item() == pytest.approx(0.5)
    assert sig_moved["sink_mass"].item() == pytest.approx(0.0)
    assert sig_moved["recent_mass"].item() == pytest.approx(0.5)  # raw mass on the last 2 context keys
    assert sig_same["sparsity"].item() == pytest.approx(0.5)  # 2 of 4 keys hold 90%


def test_group_heads_averages_query_heads_of_a_kv_group():
    per_head = torch.tensor([1.0, 3.0, 10.0, 20.0])
    assert group_heads(per_head, 2).tolist() == [2.0, 15.0]
