"""Cost curves against a brute-force eviction: mask the dropped keys, renormalise, compare outputs."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from polykv_search.calibration.costs import cost_curves


def brute_force(attn, values, ranking, budget, n_context):
    num_heads, _, _ = attn.shape
    num_kv = values.shape[0]
    group = num_heads // num_kv
    v = values.repeat_interleave(group, dim=0)  # (H, K, D)
    full = attn @ v
    lost = torch.zeros(num_kv)
    err = torch.zeros(num_kv)
    for h in range(num_heads):
        keep = torch.ones(attn.shape[-1], dtype=torch.bool)
        order = ranking[h // group].argsort(descending=True, stable=True)
        keep[order[budget:]] = False  # only context positions are in `order`
        a = attn[h] * keep
        lost[h // group] += (attn[h, :, :n_context] * ~keep[:n_context]).sum(-1).mean() / group
        out = (a / a.sum(-1, keepdim=True)) @ v[h]
        err[h // group] += ((out - full[h]).norm(dim=-1) / full[h].norm(dim=-1)).mean() / group
    return lost, err


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n_context=st.integers(5, 40), n_suffix=st.integers(1, 6),
       group=st.sampled_from([1, 2, 3]))
def test_matches_brute_force(seed, n_context, n_suffix, group):
    torch.manual_seed(seed)
    num_kv, dim = 2, 8
    k_len = n_context + n_suffix
    attn = torch.randn(num_kv * group, n_suffix, k_len).mul(3).softmax(-1)
    values = torch.randn(num_kv, k_len, dim)
    rankings = torch.randn(3, num_kv, n_context)
    budgets = [1, 2, n_context // 2 + 1, n_context, n_context + 5]
    lost, err = cost_curves(attn, values, rankings, budgets, n_context)
    assert lost.shape == err.shape == (3, num_kv, len(budgets))
    for p in range(3):
        for g, budget in enumerate(budgets):
            ref_lost, ref_err = brute_force(attn, values, rankings[p], min(budget, n_context), n_context)
            torch.testing.assert_close(lost[p, :, g], ref_lost, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(err[p, :, g], ref_err, atol=1e-4, rtol=1e-3)


def test_more_budget_never_loses_more_mass_and_full_budget_loses_nothing():
    torch.manual_seed(0)
    attn = torch.randn(4, 3, 30).softmax(-1)
    values = torch.randn(2, 30, 8)
    lost, err = cost_curves(attn, values, torch.randn(2, 2, 25), [1, 4, 8, 16, 25, 64], 25)
    assert (lost.diff(dim=-1) <= 1e-6).all()
    assert lost[..., -1].abs().max() < 1e-6 and err[..., -1].abs().max() < 1e-5
    assert (lost[..., 0] > 0).all()


def test_ranking_that_keeps_the_attended_token_costs_nothing():
    attn = torch.zeros(1, 1, 6)
    attn[0, 0, 2] = 1.0  # all mass on context token 2
    values = torch.randn(1, 6, 4)
    good = torch.tensor([[[0.0, 0.0, 9.0, 0.0, 0.0]]])  # token 2 ranked first
    bad = torch.tensor([[[9.0, 0.0, -9.0, 0.0, 0.0]]])  # token 2 ranked last
    lost_good, _ = cost_curves(attn, values, good, [1], 5)
    lost_bad, _ = cost_curves(attn, values, bad, [1], 5)
    assert lost_good.item() == 0.0 and lost_bad.item() == 1.0
