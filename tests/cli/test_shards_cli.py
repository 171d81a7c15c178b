"""`calibrate --shard K/N` into one shared --out, then `merge-profiles`: the shards' folders, the merged profile, and
a missing shard or a bad --shard as one line with exit code 2."""

import json
import sys

import pytest

from polykv_search.calibration.profile import Profile
from polykv_search.cli import main
from tests.conftest import sample_rows, write_jsonl


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["polykv-search", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code or 0
    out, err = capsys.readouterr()
    return code, out, err


def test_shards_in_one_folder_merge_into_every_sample(monkeypatch, capsys, tiny_dir, tmp_path):
    monkeypatch.delenv("POLYKV_DEBUG", raising=False)
    data = write_jsonl(tmp_path / "d.jsonl", sample_rows(3))
    out = tmp_path / "o"
    common = ["calibrate", "--model", tiny_dir, "--data", data, "--out", out, "--budgets", "8,16", "--window", "16",
              "--policies", "snapkv,knorm", "--json"]
    paths = []
    for shard in ("2/2", "1/2"):
        code, stdout, err = run_cli(monkeypatch, capsys, *common, "--shard", shard)
        assert code == 0, err
        paths.append(json.loads(stdout)["profile"])
    assert paths == [str(out / f"shard-{k}-of-2" / "profile.safetensors") for k in (2, 1)]

    code, _, err = run_cli(monkeypatch, capsys, "merge-profiles", paths[0], "--out", tmp_path / "m.safetensors")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert lines[0].startswith("error: shard 1 of 2 is missing; calibrate with --shard 1/2"), err

    code, stdout, err = run_cli(monkeypatch, capsys, "merge-profiles", *paths, "--out", tmp_path / "m.safetensors")
    assert code == 0, err
    assert "3 samples" in stdout
    merged = Profile.load(tmp_path / "m.safetensors")
    assert [s["id"] for s in merged.header["samples"]] == ["s0", "s1", "s2"] and "shard" not in merged.header


@pytest.mark.parametrize("shard", ["3/2", "x"])
def test_bad_shard_is_one_line_exit_2(monkeypatch, capsys, tiny_dir, tmp_path, shard):
    monkeypatch.delenv("POLYKV_DEBUG", raising=False)
    data = write_jsonl(tmp_path / "d.jsonl", sample_rows(1))
    code, _, err = run_cli(monkeypatch, capsys, "calibrate", "--model", tiny_dir, "--data", data, "--out",
                           tmp_path / "o", "--shard", shard)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "--shard" in lines[0], err
    assert not (tmp_path / "o").exists()
