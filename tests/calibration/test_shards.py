"""Calibration split into shards: the merged shards are bit for bit the profile one run over every sample writes,
and merges that would not be are refused in one line naming why."""

import copy

import pytest
import torch

import polykv_search as pk
from polykv_search.calibration import CalibrationConfig, Profile, calibrate_model
from polykv_search.calibration.merge import merge_profiles
from polykv_search.calibration.shards import Shard
from polykv_search.checkpoints import folder_lock
from polykv_search.data import load_samples
from polykv_search.errors import ConfigError, DataError, ProfileError
from tests.conftest import sample_rows, write_jsonl

CONFIG = CalibrationConfig(policies=("snapkv", "random"), budgets=(8, 32), window=16, layer_kl=True)
PROVENANCE = ("created", "versions", "merged_from")  # what a merged header may hold of its own


@pytest.fixture(scope="module")
def selection(tmp_path_factory):
    """Five samples; the third is too short to calibrate on, so shard 1 of 2 skips one of its three."""
    rows = sample_rows(4, words=200)
    short = {**sample_rows(1, words=20, seed=9)[0], "_id": "short"}
    return load_samples(write_jsonl(tmp_path_factory.mktemp("data") / "c.jsonl", [*rows[:2], short, *rows[2:]]))


@pytest.fixture(scope="module")
def runs(tiny_llama, selection, tmp_path_factory):
    """One run over the whole selection, and the two shards of it, each in its own folder."""
    out = tmp_path_factory.mktemp("runs")
    whole = calibrate_model(tiny_llama, selection, config=CONFIG, out_dir=out / "whole").profile
    shards = [calibrate_model(tiny_llama, selection, config=CONFIG, out_dir=out / f"s{k}", shard=(k, 2))
              for k in (1, 2)]
    return whole, [run.profile for run in shards], [run.path for run in shards]


def strip(header):
    return {k: v for k, v in header.items() if k not in PROVENANCE}


def assert_same_profile(merged, whole):
    assert set(merged.arrays) == set(whole.arrays)
    for name, array in whole.arrays.items():  # each sample's numbers come from its own prefill: exactly equal
        assert merged.arrays[name].dtype == array.dtype, name
        assert torch.equal(merged.arrays[name], array), name
    assert strip(merged.header) == strip(whole.header)


def test_shards_take_every_nth_sample_and_record_it(runs, selection):
    _, (first, second), _ = runs
    assert Shard.of("1/2").positions(5) == [0, 2, 4] and Shard.of((2, 2)).positions(5) == [1, 3]
    assert [s["id"] for s in first.header["samples"]] == ["s0", "s3"]  # "short" (position 2) was skipped
    assert [s["id"] for s in second.header["samples"]] == ["s1", "s2"]
    record = first.header["shard"]
    assert record["indices"] == [1] and record["count"] == 2 and record["positions"] == [0, 4]
    assert record["selected"] == 5 and record["split"] == "round-robin"
    assert record["selection_sha256"] == second.header["shard"]["selection_sha256"]


def test_merged_shards_equal_one_run_on_every_sample(runs):
    whole, shards, paths = runs
    assert_same_profile(merge_profiles(shards), whole)
    from_files = pk.merge_profiles(paths[::-1])  # files, in any order: the selection order comes back
    assert_same_profile(from_files, whole)
    assert [m["shard"] for m in from_files.header["merged_from"]] == ["2/2", "1/2"]
    saved = Profile.load(from_files.save(paths[0].parent.parent / "merged.safetensors"))
    assert_same_profile(saved, Profile.load(whole.save(paths[0].parent.parent / "whole.safetensors")))


def test_a_missing_shard_is_named_unless_partial_merges_are_allowed(runs):
    whole, (first, second), _ = runs
    with pytest.raises(ProfileError, match=r"^shard 2 of 2 is missing; calibrate with --shard 2/2"):
        merge_profiles([first])
    partial = merge_profiles([first], allow_partial=True)
    assert partial.header["shard"]["indices"] == [1] and partial.num_samples == 2
    assert_same_profile(merge_profiles([second, partial]), whole)  # the rest joins later


def edited(profile, change):
    other = Profile(header=copy.deepcopy(profile.header), arrays=dict(profile.arrays))
    change(other)
    return other


REFUSALS = {
    "overlap": (lambda p: None, r"^shard 2 of 2 is in profile 1 and profile 2: their samples overlap"),
    "other N": (lambda p: p.header["shard"].update(count=3), r"^profile 2 is a shard of 3 and profile 1 of 2;"),
    "other selection": (lambda p: p.header["shard"].update(selection_sha256="0" * 64),
                        r"^profile 2 is a shard of another sample selection"),
    "dtype": (lambda p: p.header["shard"].update(dtype="torch.bfloat16"),
              r"^profile 2 was calibrated in torch.bfloat16 and profile 1 in torch.float32"),
    "grid": (lambda p: p.header.update(budgets=[8, 16]), r"^profile 2 differs from profile 1 in budgets;"),
    "policies": (lambda p: p.header.update(policies=p.header["policies"][::-1]),
                 r"^profile 2 differs from profile 1 in policies;"),
    "option": (lambda p: p.header["options"].update(window=32),
               r"^profile 2 differs from profile 1 in options\.window;"),
    "model": (lambda p: p.header["model"].update(revision="other"), r"differs from profile 1 in model\.revision;"),
    "cost kinds": (lambda p: p.header["options"].update(cost_kinds=["mass_lost", "out_err"]),
                   r"differs from profile 1 in options\.cost_kinds;"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_merges_that_would_not_equal_one_run_are_refused(runs, case):
    _, (first, second), _ = runs
    change, message = REFUSALS[case]
    with pytest.raises(ProfileError, match=message):
        merge_profiles([second if case == "overlap" else first, edited(second, change)])


def test_neither_kind_of_merge_is_refused(runs, tiny_llama, selection, tmp_path):
    whole, (first, _), _ = runs
    with pytest.raises(ProfileError, match=r"^profile 2 is a shard .* and profile 1 is not a shard"):
        merge_profiles([whole, first])
    unsharded = edited(first, lambda p: p.header.pop("shard"))
    with pytest.raises(ProfileError, match="none is a shard"):
        merge_profiles([whole, unsharded])
    finer = calibrate_model(tiny_llama, selection, config=CalibrationConfig(
        policies=CONFIG.policies, budgets=(16,), window=16, layer_kl=True), out_dir=tmp_path / "f", shard=(1, 2))
    grid = merge_profiles([first, finer.profile])  # one shard on disjoint grids: still a budget-grid merge
    assert grid.budgets == [8, 16, 32] and grid.header["shard"] == first.header["shard"]


def test_shards_in_one_folder_do_not_share_a_lock(runs, tiny_llama, selection, tmp_path):
    _, (_, second), _ = runs
    with folder_lock(tmp_path / "shared" / "shard-1-of-2"):  # shard 1 is running there
        run = pk.calibrate(tiny_llama, selection, config=CONFIG, out_dir=tmp_path / "shared", shard="2/2")
    assert run.path == tmp_path / "shared" / "shard-2-of-2" / "profile.safetensors"
    for name, array in second.arrays.items():
        assert torch.equal(run.profile.arrays[name], array), name


def test_bad_shards_are_one_clear_error(tiny_llama, selection, tmp_path):
    for text, message in (("0/2", "K must be 1 to N"), ("3/2", "K must be 1 to N"), ("2", "is not K/N"),
                          ("a/b", "is not K/N")):
        with pytest.raises(ConfigError, match=message):
            Shard.of(text)
    with pytest.raises(DataError, match="only 5 samples, so shard 6 would be empty; use at most 5 shards"):
        pk.calibrate(tiny_llama, selection, config=CONFIG, out_dir=tmp_path / "e", shard=(6, 8))
    around = CalibrationConfig(policies=CONFIG.policies, budgets=(8,), window=16, around=(8,))
    with pytest.raises(ConfigError, match="--shard with --around needs --around-policy or --around-plan"):
        calibrate_model(tiny_llama, selection, config=around, out_dir=tmp_path / "a", shard=(1, 2))
    assert not (tmp_path / "e").exists() and not (tmp_path / "a").exists()
