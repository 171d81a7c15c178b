"""The scorers' reuse of the prefill's q_proj: same rankings as recomputing it, and the context is not projected
twice."""

from __future__ import annotations

import pytest
import torch

from polykv_search.models.anatomy import (
    decoder_layers,
    rotary_for_layer,
    rotary_owner,
)
from polykv_search.policies.presses import make_press
from polykv_search.policies.projections import ProjectionRows, keeping_query_projections
from polykv_search.policies.scoring import score_policies
from tests.conftest import tiny_loaded

POLICIES = ("expected_attention", "snapkv", "tova", "knorm")


def _scores(lm, *, reuse: bool, ids: torch.Tensor) -> tuple[dict[int, dict[str, torch.Tensor]], list[int]]:
    from transformers import DynamicCache

    layers = decoder_layers(lm.model)
    owner = rotary_owner(lm.model)
    presses = {name: make_press(name) for name in POLICIES}
    for press in presses.values():
        press.post_init_from_model(lm.model)
    found: dict[int, dict[str, torch.Tensor]] = {}
    projected_rows: list[int] = []  # rows of every q_proj call made while scoring

    def hook(module, args, kwargs, output):
        layer = kwargs["past_key_values"].layers[module.layer_idx]
        counter = module.q_proj.register_forward_hook(lambda m, a, o: projected_rows.append(a[0].shape[1]))
        try:
            scores, _ = score_policies(presses, module, kwargs["hidden_states"], layer.keys, layer.values, kwargs)
        finally:
            counter.remove()
        found[module.layer_idx] = {k: v[0] for k, v in scores.items()}
        return output

    modules = [layers[idx].self_attn for idx in lm.info.compressible_layers]
    handles = []
    for idx, module in zip(lm.info.compressible_layers, modules):
        module.rotary_emb = rotary_for_layer(owner, lm.info.layer_types[idx])
        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad(), keeping_query_projections(modules if reuse else []):
            lm.model(input_ids=ids, past_key_values=DynamicCache(config=lm.model.config), use_cache=True)
    finally:
        for handle in handles:
            handle.remove()
    return found, projected_rows


@pytest.mark.parametrize("kind", ["llama", "gemma"])
def test_reused_projection_gives_the_same_rankings_without_projecting_again(kind):
    lm = tiny_loaded(kind)
    ids = torch.randint(3, len(lm.tokenizer), (1, 150))
    fresh, fresh_rows = _scores(lm, reuse=False, ids=ids)
    reused, reused_rows = _scores(lm, reuse=True, ids=ids)
    assert fresh_rows and max(fresh_rows) > 64  # without reuse ExpectedAttention projects the whole context
    assert reused_rows == []  # with it, neither the context nor the window is projected again
    for idx in fresh:
        for name in POLICIES:
            torch.testing.assert_close(reused[idx][name], fresh[idx][name], rtol=1e-4, atol=1e-5)


def test_projection_rows_answers_only_slices_of_its_source():
    proj = torch.nn.Linear(8, 6)
    source = torch.randn(1, 10, 8)
    stand_in = ProjectionRows(proj, source, proj(source))
    calls = []
    proj.register_forward_hook(lambda m, a, o: calls.append(a[0].shape))
    with torch.no_grad():
        torch.testing.assert_close(stand_in(source[:, 3:7]), proj(source[:, 3:7]))
        assert len(calls) == 1  # only the reference call above ran the projection
        other = source.clone()  # equal values, other storage: computed as usual
        torch.testing.assert_close(stand_in(other[:, 2:]), proj(other[:, 2:]))
        transposed = source.transpose(0, 1)[:, :1]  # other strides: computed as usual
        stand_in(transposed)
    assert len(calls) == 4
