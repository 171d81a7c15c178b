"""calibrate --head-fisher: the answer gradients give the second-order KL of a change of one layer's attention output
(checked against the KL itself for a small change), the per-head estimate ranks cells as the probes do, and the
cells it estimates above --probe-above hold exactly the probes' KL."""

import math

import pytest
import torch
from scipy.stats import spearmanr
from transformers import DynamicCache

from polykv_search.calibration import CalibrationConfig, Profile, calibrate_model
from polykv_search.calibration.head_fisher import answer_gradients, cells_to_probe
from polykv_search.data import build_prompt, load_samples
from polykv_search.errors import ProfileError
from polykv_search.models.anatomy import decoder_layers
from polykv_search.optimization.run import OptimizeConfig, optimize_profile
from tests.conftest import sample_rows, tiny_loaded, write_jsonl


def _suffix_logprobs(lm, cache, parts, layer=None, change=None):
    """Log-probs of the answer predictions with the question and answer teacher-forced; `change` (1, S, H*D) is
    added to `layer`'s attention output before its output projection."""
    handle = None
    if change is not None:
        o_proj = decoder_layers(lm.model)[layer].self_attn.o_proj
        handle = o_proj.register_forward_pre_hook(lambda module, args: (args[0] + change, *args[1:]))
    suffix = list(parts.question_ids) + list(parts.answer_ids)
    n = len(parts.context_ids)
    try:
        copy = DynamicCache(config=lm.model.config)
        for idx, layer_cache in enumerate(cache.layers):
            copy.update(layer_cache.keys.clone(), layer_cache.values.clone(), idx)
        with torch.no_grad():
            logits = lm.model(input_ids=torch.tensor([suffix]), past_key_values=copy,
                              position_ids=torch.arange(n, n + len(suffix))[None],
                              logits_to_keep=len(parts.answer_ids) + 1).logits[0, :-1]
    finally:
        if handle is not None:
            handle.remove()
    return torch.log_softmax(logits.double(), dim=-1)


def test_the_draws_estimate_the_second_order_kl_of_a_small_change(tmp_path):
    lm = tiny_loaded("llama")
    lm.model.double()
    sample = load_samples(write_jsonl(tmp_path / "c.jsonl", sample_rows(1, words=120)))[0]
    parts = build_prompt(sample, lm.tokenizer, max_context_tokens=4096)
    cache = DynamicCache(config=lm.model.config)
    with torch.inference_mode():  # as calibrate's prefill: the gradients must not need a grad-enabled cache
        lm.model(input_ids=torch.tensor([parts.context_ids]), past_key_values=cache, use_cache=True)
    layer, draws = 1, 3000
    grads = answer_gradients(lm.model, [layer], cache, parts, draws=draws, seed=7)[layer]  # (K, H, S, D)
    assert grads.shape[0] == draws and grads.shape[1] == lm.model.config.num_attention_heads
    torch.manual_seed(3)
    direction = torch.randn(grads.shape[1:], dtype=torch.float64)  # (H, S, D)
    estimate = (torch.einsum("khsd,hsd->k", grads.double(), direction) ** 2).mean() / 2  # sum over answer tokens
    full = _suffix_logprobs(lm, cache, parts)
    eps = 1e-4
    change = eps * direction.transpose(0, 1).reshape(1, direction.shape[1], -1)  # (1, S, H*D)
    moved = _suffix_logprobs(lm, cache, parts, layer, change)
    kl = float((full.exp() * (full - moved)).sum()) / eps ** 2
    assert kl > 0 and float(estimate) == pytest.approx(kl, rel=0.15)
    again = answer_gradients(lm.model, [layer], cache, parts, draws=4, seed=7)[layer]
    assert torch.equal(again, grads[:4])  # seeded: a resumed or sharded run draws the same answers


@pytest.fixture(scope="module", params=["llama", "gemma"])
def calibrated(request, tmp_path_factory):
    lm = tiny_loaded(request.param)
    tmp = tmp_path_factory.mktemp("hf")
    samples = load_samples(write_jsonl(tmp / "c.jsonl", sample_rows(2, words=180)))
    config = CalibrationConfig(policies=("snapkv", "knorm"), budgets=(4, 16, 1000), window=16, head_kl=True,
                               head_fisher=True, draws=64, probe_above=math.inf)  # the bare estimate
    return lm, calibrate_model(lm, samples, config=config, out_dir=tmp / "out"), samples, tmp


def test_the_estimate_ranks_the_cells_as_the_probes_do(calibrated):
    lm, run, _, _ = calibrated
    fisher, kl = run.profile.arrays["head_fisher"], run.profile.arrays["head_kl"]
    assert fisher.shape == kl.shape
    profile = Profile.load(run.path)
    assert profile.cost_kinds[-2:] == ["head_kl", "head_fisher"] and profile.header["options"]["answer_draws"] == 64
    for layer in range(lm.info.num_layers):
        assert torch.isnan(fisher[:, layer]).all() == (layer not in lm.info.compressible_layers)
    for n in range(fisher.shape[0]):
        keep = torch.isfinite(kl[n]) & (kl[n] > 1e-7)
        assert keep.sum() >= 8
        assert spearmanr(kl[n][keep].numpy(), fisher[n][keep].numpy()).statistic > 0.8


def test_optimize_allocates_per_head_on_the_estimate(calibrated):
    lm, run, _, _ = calibrated
    plan = optimize_profile(run.profile, [8], config=OptimizeConfig(cost="head_fisher")).plans[0]
    slots = len(lm.info.compressible_layers) * lm.info.num_kv_heads
    assert plan.per_head and plan.constraint.total_realised == 8 * slots
    assert "cost head_fisher" in plan.search.notes
    bare = Profile(header=run.profile.header, arrays={k: v for k, v in run.profile.arrays.items()
                                                      if k != "head_fisher"})
    with pytest.raises(ProfileError, match="--head-fisher"):
        bare.head_costs("head_fisher")


def test_cells_estimated_above_the_threshold_hold_the_probes_kl(calibrated):
    lm, run, samples, tmp = calibrated
    estimate, kl = run.profile.arrays["head_fisher"], run.profile.arrays["head_kl"]
    assert not run.profile.arrays["head_fisher_probed"].any()  # inf: no cell probed
    above = float(estimate[torch.isfinite(estimate) & (estimate > 0)].median())
    config = CalibrationConfig(policies=("snapkv", "knorm"), budgets=(4, 16, 1000), window=16, head_fisher=True,
                               draws=64, probe_above=above, probe_share=1.0)
    done = calibrate_model(lm, samples, config=config, out_dir=tmp / f"hybrid-{above:g}")
    hybrid = done.profile
    probed = hybrid.arrays["head_fisher_probed"].bool()
    wanted = torch.isfinite(estimate) & (estimate > above) & (kl > 0)  # kl == 0: the budget keeps the context
    assert probed.sum() >= 4 and torch.equal(probed & (kl > 0), wanted)
    got = hybrid.arrays["head_fisher"]
    assert torch.allclose(got[probed], kl[probed].clamp_min(0), atol=1e-6)  # the probes, measured in a batch of
    assert torch.equal(got[~probed & torch.isfinite(got)], estimate[~probed & torch.isfinite(got)])  # another size
    assert Profile.load(done.path).header["options"]["probe_above"] == above


def test_at_most_the_share_of_cells_is_probed_the_largest_first():
    estimate = torch.tensor([[0.5, 0.002, float("nan")], [0.01, 0.2, 0.004]])
    assert cells_to_probe(estimate, 0.003).tolist() == [[True, False, False], [True, True, True]]
    assert cells_to_probe(estimate, 0.003, share=0.4).tolist() == [[True, False, False], [False, True, False]]
    assert not cells_to_probe(estimate, 0.003, share=0.0).any()
