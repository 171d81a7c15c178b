"""Every policy's ranking is budget-independent and its top-b is exactly what the kvpress press keeps at b."""

import pytest
import torch
from transformers import DynamicCache

from polykv_search.calibration.capture import LayerCapture
from polykv_search.errors import ConfigError
from polykv_search.policies import N_SINK_RECENT, POLICIES, REFUSED, check_policy_names
from polykv_search.policies.presses import (
    critical_order,
    interleave_with_recent,
    make_press,
    rank_scores,
    ties_newest_first,
)
from tests.conftest import tiny_loaded

T = 120


def kvpress_kept(lm, name, n_kept, ids):
    """Indices kvpress itself keeps in each layer when its press compresses the prefill to n_kept tokens: the
    compressed cache's keys found among the full cache's (compression runs after each layer's attention, so the
    keys before it are the full prefill's, bit for bit)."""
    press = make_press(name, compression_ratio=1 - (n_kept + 0.5) / T)  # kvpress keeps int(T * (1 - r))
    full, compressed = DynamicCache(config=lm.model.config), DynamicCache(config=lm.model.config)
    with torch.no_grad():
        lm.model(input_ids=ids, past_key_values=full, use_cache=True)
        with press(lm.model):
            lm.model(input_ids=ids, past_key_values=compressed, use_cache=True)
    kept = {}
    for idx, (before, after) in enumerate(zip(full.layers, compressed.layers)):
        match = (after.keys[0][:, :, None, :] == before.keys[0][:, None, :, :]).all(-1)  # (H_kv, n, T)
        kept[idx] = [set(match[h].float().argmax(-1).tolist()) for h in range(match.shape[0])]
    return kept


# Those kvpress runs on its own. Not CriticalKV around SnapKV: below 128 tokens its first stage takes some of SnapKV's
# 64 tied window tokens, which ones is kvpress's top-k's choice (tests/test_families.py checks it above 128 tokens).
KVPRESS_ONLY = [p for p in POLICIES if POLICIES[p].ranking != "with_recent" and p != "critical_snapkv"]


@pytest.mark.parametrize("name", [p for p in KVPRESS_ONLY if p != "random"] + ["random"])
def test_top_b_of_ranking_equals_kvpress_kept_set(name):
    attn = "eager" if POLICIES[name].needs_attentions else "sdpa"
    lm = tiny_loaded("llama", seed=1, attn=attn)
    ids = torch.randint(3, 60, (1, T), generator=torch.Generator().manual_seed(3))
    capture = LayerCapture(lm.model, lm.info, policies=[name], budgets=[16], window=16)
    capture.chunk_elements = 16 * T  # H2O then sums 8 query chunks
    with capture.attached(), torch.no_grad():
        capture.start_sample(T)
        capture.phase = "prefill"
        lm.model(input_ids=ids, past_key_values=DynamicCache(config=lm.model.config), use_cache=True)
        rankings = {idx: ranks[name] for idx, ranks in capture.rankings().items()}
    for n_kept in (80, 40, 10):  # SnapKV's window (64) is kept first, so 80 and 40 test both regimes
        kept = kvpress_kept(lm, name, n_kept, ids)
        for idx, ranking in rankings.items():
            for head in range(ranking.shape[0]):
                ours = set(ranking[head].topk(n_kept).indices.tolist())
                if name == "snapkv" and n_kept < 64:  # ties inside the always-kept window: any choice is valid
                    assert ours <= set(range(T - 64, T)) and kept[idx][head] <= set(range(T - 64, T))
                else:
                    assert ours == kept[idx][head], (name, n_kept, idx, head)


def test_unknown_policy_lists_the_known_ones():
    with pytest.raises(ConfigError, match="known policies: snapkv"):
        check_policy_names(["snapkv", "nope"])


def test_bad_press_parameter_is_named():
    with pytest.raises(ConfigError, match="window_siz"):
        make_press("snapkv", window_siz=3)
    with pytest.raises(ConfigError, match=r"first_stage_ratio 1.5 is outside \[0, 1\]"):
        make_press("critical_snapkv", first_stage_ratio=1.5)


def _interleaved_reference(scores: list[float], n_sink: int) -> list[int]:
    """The keep order written out: StreamingLLM's order and the score order in turn, duplicates skipped."""
    n = len(scores)
    recency = list(range(min(n_sink, n))) + list(range(n - 1, n_sink - 1, -1))
    by_score = sorted(range(n), key=lambda i: (-scores[i], i))
    order: list[int] = []
    for a, b in zip(recency, by_score):
        for token in (a, b):
            if token not in order:
                order.append(token)
    return order


@pytest.mark.parametrize("seed", range(5))
def test_with_recent_ranking_is_the_interleaved_keep_order(seed):
    gen = torch.Generator().manual_seed(seed)
    n = 37
    scores = torch.randint(0, 12, (2, n), generator=gen).float()  # ties on purpose
    ranking = interleave_with_recent(scores, 4)
    for head in range(2):
        expected = _interleaved_reference(scores[head].tolist(), 4)
        assert ranking[head].argsort(descending=True).tolist() == expected
        for budget in (10, 20):  # every other place goes to StreamingLLM's order: sinks, then newest
            kept = set(expected[:budget])
            assert set(range(4)) <= kept and n - 1 in kept


@pytest.mark.parametrize("name", [p for p in POLICIES if POLICIES[p].ranking == "with_recent"])
def test_with_recent_policy_interleaves_its_base_scorer(name):
    base = {"h2o_recent": "h2o", "tova_recent": "tova", "keydiff_recent": "keydiff",
            "expected_attention_recent": "expected_attention"}[name]
    lm = tiny_loaded("llama", seed=1, attn="sdpa")
    ids = torch.randint(3, 60, (1, T), generator=torch.Generator().manual_seed(3))
    capture = LayerCapture(lm.model, lm.info, policies=[name, base], budgets=[16], window=16)
    with capture.attached(), torch.no_grad():
        capture.start_sample(T)
        capture.phase = "prefill"
        lm.model(input_ids=ids, past_key_values=DynamicCache(config=lm.model.config), use_cache=True)
    for rankings in capture.rankings().values():
        torch.testing.assert_close(rankings[name], interleave_with_recent(rankings[base], N_SINK_RECENT))


def test_a_press_drawing_a_sketch_ranks_alike_every_time_and_leaves_the_rng_as_it_was():
    """Compactor's leverage draws a Gaussian sketch from torch's global RNG in every `score`: unseeded, calibrate and
    evaluate would rank differently. Seeded to seed + layer index it is kvpress's own score under that seed. (On the
    tiny model a sketch wider than the head (16) changes nothing, so this one is narrower.)"""
    lm = tiny_loaded("llama", seed=1, attn="sdpa")
    ids = torch.randint(3, 60, (1, T), generator=torch.Generator().manual_seed(3))
    recorded = {}

    def record(module, args, kwargs, output):
        layer = kwargs["past_key_values"].layers[module.layer_idx]
        recorded[module.layer_idx] = (module, kwargs["hidden_states"], layer.keys, layer.values, kwargs)

    handle = lm.model.model.layers[1].self_attn.register_forward_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            lm.model(input_ids=ids, past_key_values=DynamicCache(config=lm.model.config), use_cache=True)
    finally:
        handle.remove()
    module, hidden, keys, values, kwargs = recorded[1]
    press = make_press("leverage", sketch_dimension=4)
    assert not torch.equal(press.score(module, hidden, keys, values, None, kwargs),
                           press.score(module, hidden, keys, values, None, kwargs))  # kvpress's: a new sketch each call
    state = torch.get_rng_state()
    first = rank_scores("leverage", press, module, hidden, keys, values, None, kwargs)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(rank_scores("leverage", press, module, hidden, keys, values, None, kwargs), first)
    torch.manual_seed(POLICIES["leverage"].seed + 1)
    assert torch.equal(first, press.score(module, hidden, keys, values, None, kwargs).float())


def test_ties_are_ranked_newest_first_and_every_top_b_is_a_top_b_of_the_scores():
    scores = torch.tensor([[3.0, 1.0, 3.0, 2.0, 1.0, 3.0]])
    ranking = ties_newest_first(scores)
    assert ranking[0].argsort(descending=True).tolist() == [5, 2, 0, 3, 4, 1]
    for b in range(1, 7):
        assert sorted(scores[0, ranking[0].topk(b).indices].tolist()) == sorted(scores[0].topk(b).values.tolist())


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_a_press_polykv_does_not_run_is_refused_with_its_reason(name):
    with pytest.raises(ConfigError, match=rf"^policy '{name}' is not available: .+; registered policies: snapkv, "
                                          r"streaming, "):
        check_policy_names(["snapkv", name])
    assert name not in POLICIES


@pytest.mark.parametrize("ratio", [0.5, 0.3, 1.0, 0.0])
def test_critical_order_keeps_at_every_budget_what_criticalkv_keeps(ratio):
    """CriticalKV at budget b: the m = max(1, int(b x ratio)) best by the first score, then the best by the second
    among the others up to b (kvpress's rule, written out with ties broken earlier token first)."""
    gen = torch.Generator().manual_seed(7)
    n = 41
    first = torch.randint(0, 9, (2, n), generator=gen).float()  # ties on purpose
    second = torch.rand(2, n, generator=gen)
    ranking = critical_order(first, second, ratio)
    for head in range(2):
        by_first = sorted(range(n), key=lambda i: (-first[head, i].item(), i))
        by_second = sorted(range(n), key=lambda i: (-second[head, i].item(), i))
        for b in range(1, n + 1):
            m = max(1, int(b * ratio)) if ratio > 0 else 0
            stage_one = by_first[:m]
            expected = set(stage_one) | set([t for t in by_second if t not in stage_one][:b - m])
            assert set(ranking[head].topk(b).indices.tolist()) == expected, (ratio, head, b)
