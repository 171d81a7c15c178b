"""calibrate() end to end on a tiny model: profile contents, round-trip, resume after an interruption."""

import json
import logging
from dataclasses import replace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from polykv_search.calibration.profile import PROFILE_VERSION, Profile
from polykv_search.calibration import CalibrationConfig, calibrate_model
from polykv_search.calibration.profile import tensors_sha256
from polykv_search.checkpoints import (CHECKPOINT_CHECKSUM, checkpoint_file, checkpoint_sha256, fingerprint_digest,
                                      samples_digest)
from polykv_search.io import read_sealed_json, write_sealed_json
from polykv_search.data import load_samples
from polykv_search.errors import ConfigError, DataError, ProfileError
from tests.conftest import sample_rows, write_jsonl

CONFIG = CalibrationConfig(budgets=(8, 16, 32, 64, 128), window=16)


@pytest.fixture
def samples(tmp_path):
    return load_samples(write_jsonl(tmp_path / "c.jsonl", sample_rows(3)))


def test_profile_has_every_array_and_round_trips(tiny_llama, samples, tmp_path):
    result = calibrate_model(tiny_llama, samples, config=CONFIG, data_sources=[], out_dir=tmp_path / "out")
    profile = result.profile
    n_layers, n_kv = tiny_llama.info.num_layers, tiny_llama.info.num_kv_heads
    assert profile.arrays["mass_lost"].shape == (3, n_layers, n_kv, len(profile.policies), 5)
    assert not torch.isnan(profile.arrays["mass_lost"]).any()
    assert (profile.arrays["mass_lost"] >= 0).all() and (profile.arrays["mass_lost"] <= 1 + 1e-5).all()
    for name in profile.header["signals"]:
        assert profile.arrays[f"signal.{name}"].shape == (3, n_layers, n_kv)
    # random is the control: on average it must lose more than the best policy at a small budget
    costs = profile.layer_costs()[:, :, 1]  # (L, P) at 16 tokens
    assert (costs[:, profile.policies.index("random")] >= costs.min(dim=1).values).all()
    loaded = Profile.load(result.path)
    assert loaded.header == json.loads(json.dumps(profile.header))
    for key, value in profile.arrays.items():
        torch.testing.assert_close(loaded.arrays[key], value.to(loaded.arrays[key].dtype))
    assert loaded.header["model"]["num_layers"] == n_layers
    assert [s["id"] for s in loaded.header["samples"]] == ["s0", "s1", "s2"]
    assert loaded.header["versions"]["kvpress"]


def test_sliding_window_layers_are_recorded_and_left_out(tiny_gemma, samples, tmp_path):
    profile = calibrate_model(tiny_gemma, samples, config=CONFIG, out_dir=tmp_path / "g").profile
    assert profile.header["model"]["layer_types"][0] == "sliding_attention"
    assert torch.isnan(profile.arrays["mass_lost"][:, 0]).all()  # fixed by the architecture
    assert not torch.isnan(profile.arrays["mass_lost"][:, 1]).any()


class Interrupt(Exception):
    pass


def test_resume_continues_without_redoing_samples(tiny_llama, samples, tmp_path):
    out = tmp_path / "run"
    seen = []

    def stop_after_two(result):
        seen.append(result.index)
        if len(seen) == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        calibrate_model(tiny_llama, samples, config=CONFIG, out_dir=out, progress=stop_after_two)
    assert not (out / "profile.safetensors").exists()  # nothing half-written

    run = calibrate_model(tiny_llama, samples, config=CONFIG, out_dir=out, resume=True)
    resumed = run.profile
    assert [r.index for r in run.results if not r.resumed] == [2]  # the two finished ones come from checkpoints
    fresh = calibrate_model(tiny_llama, samples, config=CONFIG, out_dir=tmp_path / "fresh").profile
    torch.testing.assert_close(resumed.arrays["mass_lost"], fresh.arrays["mass_lost"])


def test_resume_over_more_samples_reuses_the_first_ones(tiny_llama, samples, tmp_path, caplog):
    out = tmp_path / "grow"
    calibrate_model(tiny_llama, samples[:2], config=CONFIG, out_dir=out)
    grown = calibrate_model(tiny_llama, samples, config=CONFIG, out_dir=out, resume=True)
    assert [r.resumed for r in grown.results] == [True, True, False]
    fresh = calibrate_model(tiny_llama, samples, config=CONFIG, out_dir=tmp_path / "fresh").profile
    torch.testing.assert_close(grown.profile.arrays["mass_lost"], fresh.arrays["mass_lost"])
    edited = [samples[0], replace(samples[1], answers=["another answer"]), samples[2]]
    with caplog.at_level(logging.INFO, logger="polykv_search"):
        again = calibrate_model(tiny_llama, edited, config=CONFIG, out_dir=out, resume=True)
    assert [r.resumed for r in again.results] == [True, False, True]  # only the edited sample is redone
    assert any("2 of 3 samples have a checkpoint" in r.getMessage() for r in caplog.records)
    backwards = calibrate_model(tiny_llama, edited[::-1], config=CONFIG, out_dir=out, resume=True)
    assert all(r.resumed for r in backwards.results)  # found by sample, wherever it stands
    assert [(r.index, r.sample_id) for r in backwards.results] == [(0, "s2"), (1, "s1"), (2, "s0")]


def test_resume_reuses_the_checkpoints_of_a_run_made_before_they_named_their_samples(tiny_llama, samples, tmp_path):
    out = tmp_path / "old"
    calibrate_model(tiny_llama, samples[:2], config=CONFIG, out_dir=out)
    ckpt = out / "checkpoints"
    old = {k: v for k, v in read_sealed_json(ckpt / "run.json").items() if k != "checkpoints"}
    old["samples"] = samples_digest(samples[:2])  # the run.json and checkpoints an older version wrote
    write_sealed_json(ckpt / "run.json", old)
    for index, sample in enumerate(samples[:2]):  # files named by position, as an older version wrote them
        path = ckpt / checkpoint_file(sample, ".safetensors")
        path = path.rename(ckpt / f"sample-{index:05d}.safetensors")
        arrays = load_file(str(path))
        with safe_open(str(path), framework="pt") as handle:
            meta = {k: v for k, v in (handle.metadata() or {}).items() if k not in ("sample", CHECKPOINT_CHECKSUM)}
        meta["run"] = fingerprint_digest(old)
        meta[CHECKPOINT_CHECKSUM] = checkpoint_sha256(tensors_sha256(arrays), meta)
        save_file(arrays, str(path), metadata=meta)
    grown = calibrate_model(tiny_llama, samples, config=CONFIG, out_dir=out, resume=True)
    assert [r.resumed for r in grown.results] == [True, True, False]
    again = calibrate_model(tiny_llama, samples, config=CONFIG, out_dir=out, resume=True)  # run.json now says so
    assert all(r.resumed for r in again.results)
    other = tmp_path / "other"
    calibrate_model(tiny_llama, samples[1:2], config=CONFIG, out_dir=other)
    write_sealed_json(other / "checkpoints" / "run.json", old)  # an older run over samples 1-2, resumed over 2-3
    with pytest.raises(ProfileError, match="made with a different samples"):
        calibrate_model(tiny_llama, samples[1:], config=CONFIG, out_dir=other, resume=True)


def test_resume_with_other_settings_is_refused(tiny_llama, samples, tmp_path):
    calibrate_model(tiny_llama, samples[:1], config=CONFIG, out_dir=tmp_path / "r")
    other = CalibrationConfig(budgets=(8, 16), window=16)
    with pytest.raises(ProfileError, match=r"different config\.budgets;"):  # names what changed
        calibrate_model(tiny_llama, samples[:1], config=other, out_dir=tmp_path / "r", resume=True)


def test_bad_budget_grid_and_empty_data(tiny_llama, samples, tmp_path):
    with pytest.raises(ConfigError, match="at least 1 token"):
        calibrate_model(tiny_llama, samples, config=CalibrationConfig(budgets=(0, 16)), out_dir=tmp_path / "b")
    with pytest.raises(DataError, match="empty"):
        calibrate_model(tiny_llama, [], config=CONFIG, out_dir=tmp_path / "e")
    assert not (tmp_path / "b" / "profile.safetensors").exists()


def test_profile_from_another_version_is_refused(tiny_llama, samples, tmp_path):
    profile = calibrate_model(tiny_llama, samples[:1], config=CONFIG, out_dir=tmp_path / "v").profile
    profile.header["format_version"] = PROFILE_VERSION + 1
    path = profile.save(tmp_path / "future.safetensors")
    with pytest.raises(ProfileError, match="re-run `polykv-search calibrate`"):
        Profile.load(path)
    (tmp_path / "junk.safetensors").write_bytes(b"not a profile")
    with pytest.raises(ProfileError, match="not a readable"):
        Profile.load(tmp_path / "junk.safetensors")
