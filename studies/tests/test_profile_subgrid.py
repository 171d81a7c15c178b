"""studies/profile_subgrid.py: a profile restricted to some grid levels equals those levels of the original."""

import importlib.util
from pathlib import Path

import pytest
import torch

from polykv_search.calibration import CalibrationConfig, Profile, calibrate_model
from polykv_search.data import load_samples
from tests.conftest import sample_rows, write_jsonl

STUDIES = Path(__file__).parents[1]
spec = importlib.util.spec_from_file_location("profile_subgrid", STUDIES / "profile_subgrid.py")
subgrid_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(subgrid_module)


def test_subgrid_keeps_the_chosen_levels_of_every_cost(tiny_llama, tmp_path):
    samples = load_samples(write_jsonl(tmp_path / "c.jsonl", sample_rows(1, words=200)))
    config = CalibrationConfig(budgets=(4, 8, 16, 32), window=16, head_kl=True, policies=("snapkv", "streaming"))
    profile = calibrate_model(tiny_llama, samples, config=config, out_dir=tmp_path / "full").profile
    small = subgrid_module.subgrid(profile, [32, 4])
    assert small.budgets == [4, 32]
    for kind in ("mass_lost", "out_err", "head_kl"):
        assert torch.allclose(small.arrays[kind], profile.arrays[kind][..., [0, 3]], rtol=0, atol=0, equal_nan=True)
    signals = [k for k in profile.arrays if k.startswith("signal.")]
    assert signals and all(torch.equal(small.arrays[k], profile.arrays[k]) for k in signals)
    saved = Profile.load(small.save(tmp_path / "small.safetensors"))  # checksum and range checks pass
    assert saved.budgets == [4, 32]
    with pytest.raises(SystemExit, match="not in the profile's grid"):
        subgrid_module.subgrid(profile, [5])
