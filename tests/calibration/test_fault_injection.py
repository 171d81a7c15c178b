"""Issue 33, fault injection on a tiny model: calibrate stopped at several points (between samples, inside a
checkpoint's write, inside the profile's write) and resumed gives the profile of an uninterrupted run; one bit
flipped at random in any file the project reads back (checkpoints, run.json, profile, plan, guard cache, evaluate
checkpoints) is refused, never used."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

import polykv_search.calibration.run as calibration_run
import polykv_search.io as io
from polykv_search.optimization.guard import read_guard_cache
from polykv_search.calibration import CalibrationConfig, calibrate_model
from polykv_search.calibration.profile import Profile
from polykv_search.checkpoints import checkpoint_file, prepare_checkpoints, read_sealed_checkpoint
from polykv_search.data import load_samples
from polykv_search.errors import PolykvError
from polykv_search.io import read_sealed_json, write_sealed_json
from polykv_search.plan import PlanFile, uniform_plan
from tests.conftest import sample_rows, write_jsonl

CONFIG = CalibrationConfig(policies=("streaming", "snapkv"), budgets=(8, 16), window=16)
FLIPS = 24  # random bits per file


class Killed(BaseException):
    """Stands for a kill: not an Exception, so nothing on the way catches it."""


@pytest.fixture(scope="module")
def setup(tiny_llama, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    samples = load_samples(write_jsonl(tmp / "d.jsonl", sample_rows(3)))
    fresh = calibrate_model(tiny_llama, samples, config=CONFIG, out_dir=tmp / "fresh")
    return tiny_llama, samples, fresh, tmp


def assert_same_profile(a: Profile, b: Profile) -> None:
    assert a.arrays.keys() == b.arrays.keys()
    for key in a.arrays:
        torch.testing.assert_close(a.arrays[key], b.arrays[key], rtol=0, atol=0, equal_nan=True)
    drop = {"created"}
    assert {k: v for k, v in a.header.items() if k not in drop} == {k: v for k, v in b.header.items() if k not in drop}


@pytest.mark.parametrize("where", ["after sample 1", "after sample 2", "writing checkpoint 2", "writing the profile"])
def test_killed_then_resumed_gives_the_uninterrupted_profile(setup, monkeypatch, where):
    lm, samples, fresh, tmp = setup
    out = tmp / where.replace(" ", "-")
    progress = None
    if where.startswith("after"):
        stop = int(where[-1])

        def progress(result):
            if result.index + 1 == stop:
                raise Killed
    else:
        target = checkpoint_file(samples[1], "") if "checkpoint" in where else "profile"
        real = io.os.replace

        def replace(src, dst):  # the temp file is written whole, then the process dies before the rename
            if Path(dst).name.startswith(target):
                raise Killed
            return real(src, dst)

        monkeypatch.setattr(io.os, "replace", replace)
    with pytest.raises(Killed):
        calibrate_model(lm, samples, config=CONFIG, out_dir=out, progress=progress)
    monkeypatch.undo()
    assert not (out / "profile.safetensors").exists()
    resumed = calibrate_model(lm, samples, config=CONFIG, out_dir=out, resume=True)
    assert any(r.resumed for r in resumed.results)
    assert_same_profile(resumed.profile, fresh.profile)


def flipped_copies(path: Path, tmp: Path, seed: int):
    """(copy of `path` with one random bit flipped, the bit) for FLIPS random bits."""
    raw = path.read_bytes()
    rng = random.Random(seed)
    for k in range(FLIPS):
        bit = rng.randrange(len(raw) * 8)
        data = bytearray(raw)
        data[bit // 8] ^= 1 << (bit % 8)
        copy = tmp / f"{k}-{path.name}"
        copy.write_bytes(bytes(data))
        yield copy, bit


def refused_or_same(read, original, path: Path, tmp: Path, seed: int) -> None:
    """Every flipped copy is refused (PolykvError, or None from a cache), or reads back exactly as the original (a
    bit whose flip leaves the content as it was, e.g. the case of a hex digit in a JSON \\u escape)."""
    for copy, bit in flipped_copies(path, tmp, seed):
        try:
            got = read(copy)
        except PolykvError:
            continue
        assert got is None or got == original, f"bit {bit} of {path.name} flipped was used"


def test_a_flipped_bit_in_a_calibrate_file_is_refused(setup, tmp_path):
    lm, samples, fresh, tmp = setup
    ckpt_dir = tmp / "fresh" / "checkpoints"
    fingerprint = {k: v for k, v in read_sealed_json(ckpt_dir / "run.json").items() if k != "checkpoints"}
    digest = prepare_checkpoints(ckpt_dir, fingerprint, resume=True, samples=samples)

    def checkpoint(path):
        record, result = calibration_run._load_checkpoint(path, digest, 0, samples[0])
        return {k: v.tolist() for k, v in record.signals.items()}, record.mass_lost.tolist(), result

    first = ckpt_dir / checkpoint_file(samples[0], ".safetensors")
    original = checkpoint(first)
    refused_or_same(checkpoint, original, first, tmp_path, seed=1)

    def run_file(path):
        folder = tmp_path / "ck"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        shutil.copy(path, folder / "run.json")
        return prepare_checkpoints(folder, fingerprint, resume=True, samples=samples)

    refused_or_same(run_file, digest, ckpt_dir / "run.json", tmp_path, seed=2)

    def profile(path):
        loaded = Profile.load(path)
        return loaded.header, {k: v.tolist() for k, v in loaded.arrays.items()}

    refused_or_same(profile, profile(fresh.path), fresh.path, tmp_path, seed=3)


def test_a_flipped_bit_in_a_plan_guard_cache_or_evaluate_checkpoint_is_refused(tiny_llama, tmp_path):
    plan = PlanFile.build(tiny_llama.info, [uniform_plan(tiny_llama.info, policy="snapkv", budget=b)
                                            for b in (8, 16)])
    path = plan.save(tmp_path / "plan.json")
    refused_or_same(lambda p: PlanFile.load(p), plan, path, tmp_path, seed=4)

    cache = write_sealed_json(tmp_path / "guard.json", {"run": "k", "samples": 2, "entries": {
        "a": {"task": 0.25, "lost": 0.125}, "b": {"task": 0.5, "lost": 0.0625}}})
    original = read_guard_cache(cache, "k")
    assert original is not None
    refused_or_same(lambda p: read_guard_cache(p, "k"), original, cache, tmp_path, seed=5)

    evaluated = write_sealed_json(tmp_path / "sample-00000.json", {"run": "d", "rows": [{"score": 0.5}]})
    refused_or_same(lambda p: read_sealed_checkpoint(p, "sample 1"), read_sealed_checkpoint(evaluated, "sample 1"),
                    evaluated, tmp_path, seed=6)


def test_a_plan_without_its_checksum_is_refused_until_sealed(tiny_llama, tmp_path, monkeypatch, capsys):
    from polykv_search.errors import PlanError
    from polykv_search.plan.seal import seal_plan_file

    plan = PlanFile.build(tiny_llama.info, [uniform_plan(tiny_llama.info, policy="snapkv", budget=8)])
    data = json.loads(plan.to_json())
    del data["checksum"]
    path = tmp_path / "hand.json"
    path.write_text(json.dumps(data))  # as another tool writes it
    with pytest.raises(PlanError, match=r"has no checksum.*polykv-search validate --seal"):
        PlanFile.load(path)
    assert seal_plan_file(path) == "sealed" and PlanFile.load(path) == plan
    assert seal_plan_file(path) == "already sealed"
    data["plans"][0]["search"]["notes"] = "edited by hand"
    path.write_text(json.dumps({**data, "checksum": json.loads(path.read_text())["checksum"]}))
    with pytest.raises(PlanError, match="damaged or was edited"):
        PlanFile.load(path)
    assert seal_plan_file(path) == "sealed again" and PlanFile.load(path).plans[0].search.notes == "edited by hand"
