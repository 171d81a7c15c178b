"""The profile header read as types: what each stage reads of a profile (samples, data sources, shard record), from
today's profiles and from older ones that lack fields."""

from __future__ import annotations

from polykv_search.calibration import ProfileHeader, ProfileSample
from polykv_search.calibration.profile import (ALL_COST_KINDS, AROUND_KL, COST_KINDS, HEAD_COST_KINDS,
                                               OPTIONAL_COST_KINDS)
from tests.plan.factories import llama_like, make_profile


def test_meta_reads_the_stored_header_as_types():
    profile = make_profile(llama_like(4), entropy=[0.1] * 4, variance=[0.2] * 4, samples=3)
    profile.header["data"] = [{"source": "calibration_data/calib.jsonl", "sha256": "ab"}]
    meta = profile.meta
    assert isinstance(meta, ProfileHeader) and meta.model == profile.model
    assert meta.policies == tuple(profile.policies) and meta.budgets == tuple(profile.budgets)
    assert all(isinstance(s, ProfileSample) for s in meta.samples) and meta.sample_ids == ["s0", "s1", "s2"]
    assert meta.data_sources == ["calibration_data/calib.jsonl"] and meta.shard is None
    assert [ProfileSample.from_dict(s.to_dict()) for s in meta.samples] == list(meta.samples)


def test_meta_of_an_older_header_fills_what_it_lacks():
    profile = make_profile(llama_like(2), entropy=[0.1] * 2, variance=[0.2] * 2, samples=2)
    for key in ("data", "options", "signals", "created"):
        profile.header.pop(key, None)
    for record in profile.header["samples"]:
        record.pop("id", None)
    meta = profile.meta
    assert meta.data_sources == [] and meta.options == {} and meta.sample_ids == [None, None]


def test_the_cost_names_are_the_profile_cost_kinds_in_order():
    assert ALL_COST_KINDS == (*COST_KINDS, *OPTIONAL_COST_KINDS, AROUND_KL, *HEAD_COST_KINDS)
