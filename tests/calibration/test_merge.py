"""Profiles on disjoint budget grids merge into the profile one run on the union grid writes."""

import pytest
import torch

from polykv_search.calibration.merge import merge_budget_grids
from polykv_search.calibration.profile import Profile
from polykv_search.calibration import CalibrationConfig, calibrate_model
from polykv_search.data import load_samples
from polykv_search.errors import ProfileError
from tests.conftest import sample_rows, write_jsonl

POLICIES = ("snapkv", "streaming")


def _profile(lm, samples, budgets, out):
    config = CalibrationConfig(policies=POLICIES, budgets=budgets, window=16, layer_kl=True, head_fisher=True,
                               draws=4, probe_above=0.0, probe_share=1.0)  # every cell probed: grid-independent
    return calibrate_model(lm, samples, config=config, out_dir=out).profile


def test_merged_grids_equal_one_run_on_the_union(tiny_llama, tmp_path):
    samples = load_samples(write_jsonl(tmp_path / "c.jsonl", sample_rows(2, words=200)))
    union = _profile(tiny_llama, samples, (8, 16, 32, 64), tmp_path / "u")
    coarse = _profile(tiny_llama, samples, (16, 64), tmp_path / "a")
    fine = _profile(tiny_llama, samples, (8, 32), tmp_path / "b")
    merged = merge_budget_grids([coarse, fine])
    assert merged.budgets == [8, 16, 32, 64]
    assert merged.cost_kinds == union.cost_kinds == ["mass_lost", "out_err", "layer_kl", "layer_nll", "head_fisher"]
    assert merged.arrays["head_fisher_probed"].any()
    for kind, array in union.arrays.items():
        torch.testing.assert_close(merged.arrays[kind], array, rtol=1e-4, atol=1e-5, equal_nan=True)
    path = merged.save(tmp_path / "m.safetensors")
    assert Profile.load(path).budgets == [8, 16, 32, 64]
    with pytest.raises(ProfileError, match=r"budget level\(s\) \[16, 64\] are in more than one profile"):
        merge_budget_grids([coarse, union])
    other = _profile(tiny_llama, samples[:1], (8, 32), tmp_path / "c")
    with pytest.raises(ProfileError, match="differs from profile 1 in 'samples'"):
        merge_budget_grids([coarse, other])
