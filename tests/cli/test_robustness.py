"""Each bad input a new user tried (issue 18), rerun through the command line: one line, exit 2 (130 for an
interrupt), nothing half-written, nothing lost. Shared output folders are locked; checkpoints and profiles carry
what they were made with and are refused when damaged or mixed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from polykv_search.calibration.profile import CHECKSUM_KEY, HEADER_KEY, Profile, profile_sha256
from polykv_search.checkpoints import LOCK_NAME, checkpoint_file
from polykv_search.cli import main
from polykv_search.data import load_samples
from polykv_search.models import model_slug
from tests.conftest import sample_rows as needle_rows
from tests.conftest import interruptible, write_jsonl


def sample_rows(n: int, **kwargs) -> list[dict]:
    """Rows of a built-in task (an unknown one adds its fallback warning to stderr)."""
    return [{**row, "dataset": "multifieldqa_en"} for row in needle_rows(n, **kwargs)]


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["polykv-search", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out, err = capsys.readouterr()
    return exit_info.value.code, out, [line for line in err.splitlines() if line.strip()]


def run_ok(monkeypatch, capsys, *args):
    """A command that must succeed: main() returns; (stdout, stderr lines)."""
    monkeypatch.setattr(sys, "argv", ["polykv-search", *map(str, args)])
    main()
    out, err = capsys.readouterr()
    return out, [line for line in err.splitlines() if line.strip()]


def one_line_error(code, lines, *fragments):
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def profile_file(tiny_dir, tmp_path_factory):
    """A real calibrate run on the tiny model (2 samples): its profile and checkpoints."""
    out = tmp_path_factory.mktemp("calib")
    data = write_jsonl(out / "d.jsonl", sample_rows(2))
    subprocess.run([sys.executable, "-m", "polykv_search", "calibrate", "--model", str(tiny_dir), "--data",
                    str(data), "--out", str(out / "o"), "--budgets", "8,16", "--window", "16"], check=True,
                   capture_output=True, timeout=300)
    return out / "o" / "profile.safetensors"


def rewrite_profile(source: Path, target: Path, *, arrays=None, header=None, checksum="reseal") -> Path:
    """The profile at `source` with other arrays or header; its checksum recomputed ("reseal": an edit made on
    purpose, so the checks after it are reached), left as it was ("keep") or dropped ("drop")."""
    with safe_open(str(source), framework="pt") as handle:
        meta = dict(handle.metadata())
    tensors = load_file(str(source)) if arrays is None else arrays
    if header is not None:
        meta[HEADER_KEY] = header
    if checksum == "reseal":
        meta[CHECKSUM_KEY] = profile_sha256(tensors, meta[HEADER_KEY])
    elif checksum == "drop":
        meta.pop(CHECKSUM_KEY, None)
    save_file(tensors, str(target), metadata=meta)
    return target


# -- two writers on one folder -------------------------------------------------------------------------
def test_a_second_calibrate_on_a_live_folder_is_refused_at_once(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", sample_rows(600, words=200))  # long enough to overlap
    out = tmp_path / "o"
    args = [sys.executable, "-m", "polykv_search", "calibrate", "--model", str(tiny_dir), "--data", str(data),
            "--out", str(out), "--budgets", "8,16", "--window", "16"]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=interruptible)
    try:
        deadline = time.time() + 120
        while not list((out / "checkpoints").glob("sample-*.safetensors")) and first.poll() is None \
                and time.time() < deadline:
            time.sleep(0.05)
        assert (out / LOCK_NAME).exists()
        second = subprocess.run([*args, "--budgets", "8,32"], capture_output=True, text=True, timeout=120)
        assert first.poll() is None, "the first run ended before the second started: give it more samples"
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert second.returncode == 2 and len(lines) == 1, second.stderr
        assert f"in use by another polykv-search run (PID {first.pid}" in lines[0]
        assert json.loads((out / "checkpoints" / "run.json").read_text())["config"]["budgets"] == [8, 16]
    finally:
        first.send_signal(signal.SIGINT)
        first.communicate(timeout=120)
    assert first.returncode == 130 and not (out / LOCK_NAME).exists()


def test_a_lock_left_by_a_dead_process_is_taken_over(monkeypatch, capsys, tiny_dir, tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    out = tmp_path / "o"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": gone.pid, "host": os.uname().nodename, "started": 0}))
    (out / ".profile.safetensors.abc123.tmp").write_bytes(b"")  # a kill during the final write
    data = write_jsonl(tmp_path / "d.jsonl", sample_rows(1))
    _, lines = run_ok(monkeypatch, capsys, "calibrate", "--model", tiny_dir, "--data", data, "--out", out,
                      "--budgets", "8,16", "--window", "16", "--json")
    assert any("taking over" in line and str(gone.pid) in line for line in lines), lines
    assert not (out / LOCK_NAME).exists() and not list(out.glob(".*.tmp"))


# -- checkpoints record what they were made with -------------------------------------------------------
def test_resume_redoes_an_edited_sample_and_refuses_other_settings_and_a_checkpoint_of_another_run(monkeypatch, capsys, tiny_dir, tmp_path):
    rows = sample_rows(2)
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    common = ["calibrate", "--model", tiny_dir, "--data", data, "--budgets", "8,16", "--json"]
    for out, window in (("a", "16"), ("b", "8")):  # same array shapes, other settings
        run_ok(monkeypatch, capsys, *common, "--out", tmp_path / out, "--window", window)
    rows[1]["answers"] = ["another answer"]  # same ids and lengths: only the content tells
    write_jsonl(data, rows)
    _, lines = run_ok(monkeypatch, capsys, *common, "--out", tmp_path / "a", "--window", "16", "--resume")
    assert any("1 of 2 samples have a checkpoint" in line for line in lines), lines
    code, _, lines = run_cli(monkeypatch, capsys, *common, "--out", tmp_path / "a", "--window", "8", "--resume")
    one_line_error(code, lines, "made with a different config.window", f"delete {tmp_path / 'a' / 'checkpoints'} to redo")
    write_jsonl(data, sample_rows(2))
    second = checkpoint_file(load_samples(data)[1], ".safetensors")
    foreign = tmp_path / "b" / "checkpoints" / second
    (tmp_path / "a" / "checkpoints" / second).write_bytes(foreign.read_bytes())
    code, _, lines = run_cli(monkeypatch, capsys, *common, "--out", tmp_path / "a", "--window", "16", "--resume")
    lines = [line for line in lines if not line.startswith(("calibrate ", "INFO     device: "))]  # work had begun:
    # the bar of the first, resumed sample, and the device it runs on
    one_line_error(code, lines, f"{second} was made by another run")


# -- damaged profiles ----------------------------------------------------------------------------------
def test_flipped_bytes_in_a_profile_are_refused(monkeypatch, capsys, profile_file, tmp_path):
    raw = bytearray(profile_file.read_bytes())
    raw[-40:-36] = b"\xff\xff\x7f\xc3"  # inside the tensor data
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(bytes(raw))
    code, _, lines = run_cli(monkeypatch, capsys, "optimize", "--profile", damaged, "--budget", "12", "--out",
                             tmp_path / "plan.json")
    one_line_error(code, lines, "damaged or was edited", "re-run calibrate")
    assert not (tmp_path / "plan.json").exists()


def test_costs_out_of_range_are_refused_even_with_a_matching_checksum(monkeypatch, capsys, profile_file, tmp_path):
    arrays = load_file(str(profile_file))
    arrays["mass_lost"] = arrays["mass_lost"].clone()
    arrays["mass_lost"].view(-1)[0] = -131.0
    edited = rewrite_profile(profile_file, tmp_path / "edited.safetensors", arrays=arrays)
    code, _, lines = run_cli(monkeypatch, capsys, "optimize", "--profile", edited, "--budget", "12", "--out",
                             tmp_path / "plan.json")
    one_line_error(code, lines, "mass_lost holds -131", "outside [", "re-run calibrate")


@pytest.mark.parametrize(("checksum", "message"), [("drop", "has no checksum"), ("keep", "damaged or was edited")])
def test_an_edited_profile_is_refused_with_or_without_its_checksum(monkeypatch, capsys, profile_file, tmp_path,
                                                                    checksum, message):
    """Issue 33: a version-2 profile with its checksum deleted and a value edited was used silently."""
    arrays = load_file(str(profile_file))
    arrays["mass_lost"] = arrays["mass_lost"].clone()
    arrays["mass_lost"].view(-1)[0] = 0.5  # in range: only the checksum tells
    edited = rewrite_profile(profile_file, tmp_path / "edited.safetensors", arrays=arrays, checksum=checksum)
    code, _, lines = run_cli(monkeypatch, capsys, "optimize", "--profile", edited, "--budget", "12", "--out",
                             tmp_path / "plan.json")
    one_line_error(code, lines, message, "re-run calibrate")
    assert not (tmp_path / "plan.json").exists()


def test_an_edited_profile_header_is_refused(monkeypatch, capsys, profile_file, tmp_path):
    header = Profile.load(profile_file).header
    header["samples"][0]["task"] = "edited"
    edited = rewrite_profile(profile_file, tmp_path / "p.safetensors", header=json.dumps(header), checksum="keep")
    code, _, lines = run_cli(monkeypatch, capsys, "optimize", "--profile", edited, "--budget", "12", "--out",
                             tmp_path / "plan.json")
    one_line_error(code, lines, "damaged or was edited")


@pytest.mark.parametrize(("header", "message"), [
    ("{not json", "header is not JSON"),
    ("[1, 2]", "header is a JSON list"),
    (json.dumps({"format": "polykv-profile", "format_version": 2}), "header lacks model, policies, budgets"),
])
def test_a_damaged_profile_header_is_one_line(monkeypatch, capsys, profile_file, tmp_path, header, message):
    bad = rewrite_profile(profile_file, tmp_path / "bad.safetensors", header=header)
    code, _, lines = run_cli(monkeypatch, capsys, "optimize", "--profile", bad, "--budget", "12", "--out",
                             tmp_path / "plan.json")
    one_line_error(code, lines, message)


def test_optimize_refuses_a_model_other_than_the_profiles(monkeypatch, capsys, profile_file, tmp_path):
    code, _, lines = run_cli(monkeypatch, capsys, "optimize", "--model", "gemma3-270m", "--profile", profile_file,
                             "--budget", "12", "--out", tmp_path / "plan.json")
    one_line_error(code, lines, "--model gemma3-270m does not match the profile")
    assert not (tmp_path / "plan.json").exists()


def test_a_model_id_of_dotdot_stays_under_outputs(monkeypatch, capsys, profile_file, tmp_path):
    profile = Profile.load(profile_file)
    header = {**profile.header, "model": {**profile.header["model"], "model_id": ".."}}
    edited = rewrite_profile(profile_file, tmp_path / "p.safetensors", header=json.dumps(header))
    monkeypatch.chdir(tmp_path)
    run_ok(monkeypatch, capsys, "optimize", "--profile", edited, "--budget", "12")
    assert (tmp_path / "outputs" / "model" / "plan.json").is_file()
    assert not (tmp_path / "plan.json").exists()
    assert model_slug("..") == "model" and model_slug("a/b c") == "b_c"


# -- options refused before any work -------------------------------------------------------------------
def test_output_paths_of_the_wrong_kind(monkeypatch, capsys, tiny_dir, profile_file, tmp_path):
    folder = tmp_path / "afolder"
    folder.mkdir()
    code, _, lines = run_cli(monkeypatch, capsys, "optimize", "--profile", profile_file, "--budget", "12", "--out",
                             folder)
    one_line_error(code, lines, "is a folder; give a file name")
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    data = write_jsonl(tmp_path / "d.jsonl", sample_rows(1))
    code, _, lines = run_cli(monkeypatch, capsys, "calibrate", "--model", tiny_dir, "--data", data, "--out", a_file)
    one_line_error(code, lines, "is a file; give a folder")


@pytest.mark.parametrize(("args", "message"), [
    (["--solver", "optuna", "--storage", "notascheme:xyz"], "cannot open Optuna storage"),
    (["--solver", "optuna", "--storage", "sqlite:////nonexistent-dir/x/y.db"], "cannot open Optuna storage"),
    (["--storage", "journal:x.log"], "--storage is for --solver optuna"),
    (["--solver", "ilp", "--time-limit", "0"], "--time-limit 0 must be positive and --gap"),
])
def test_solver_options_are_checked_before_the_model_loads(monkeypatch, capsys, tmp_path, args, message):
    # the model is a hub id that cannot load here: an option error must come first
    code, _, lines = run_cli(monkeypatch, capsys, "optimize", "--model", "nobody/no-such-model", "--profile",
                             tmp_path / "none.safetensors", "--budget", "12", *args)
    one_line_error(code, lines, message)


def test_a_hub_id_fails_fast_when_the_hub_cannot_be_reached(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    data = write_jsonl(tmp_path / "d.jsonl", sample_rows(1))
    code, _, lines = run_cli(monkeypatch, capsys, "calibrate", "--model", "nobody/not-cached-model", "--data", data,
                             "--out", tmp_path / "o")
    one_line_error(code, lines, "not in the local Hugging Face cache", "cannot be reached")
    code, _, lines = run_cli(monkeypatch, capsys, "calibrate", "--model", "nobody/not-cached-model", "--data",
                             "nobody/some-dataset", "--out", tmp_path / "o")
    one_line_error(code, lines, "cannot load data set 'nobody/some-dataset'", "HF_HUB_OFFLINE=1")


def test_a_pickle_that_runs_code_is_one_line(monkeypatch, capsys, tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=100).save_pretrained(tmp_path / "evil")

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'PWNED'}",))

    torch.save({"model.embed_tokens.weight": Evil()}, tmp_path / "evil" / "pytorch_model.bin")
    data = write_jsonl(tmp_path / "d.jsonl", sample_rows(1))
    code, _, lines = run_cli(monkeypatch, capsys, "calibrate", "--model", tmp_path / "evil", "--data", data,
                             "--out", tmp_path / "o")
    one_line_error(code, lines, "a pickle that torch refuses to load safely")
    assert not (tmp_path / "PWNED").exists()


def test_non_utf8_data_names_the_line(monkeypatch, capsys, tiny_dir, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_bytes(json.dumps(sample_rows(1)[0]).encode() + b"\n" + b'{"context": "caf\xe9"}\n')
    code, _, lines = run_cli(monkeypatch, capsys, "calibrate", "--model", tiny_dir, "--data", data, "--out",
                             tmp_path / "o")
    one_line_error(code, lines, "d.jsonl:2: not UTF-8 text (byte 0xe9", "save the file as UTF-8")


def test_a_huge_plan_file_is_refused_before_it_is_read(monkeypatch, capsys, tmp_path):
    junk = tmp_path / "junk.json"
    with junk.open("wb") as handle:
        handle.truncate(50 * 2**20)
    code, _, lines = run_cli(monkeypatch, capsys, "validate", junk)
    one_line_error(code, lines, "50.0 MiB", "it is not a plan file")


def test_validate_with_the_model_refuses_a_budget_beyond_its_context(monkeypatch, capsys, tiny_dir, tmp_path):
    run_ok(monkeypatch, capsys, "baseline", "--kind", "uniform", "--budget", "1000000000000", "--model", tiny_dir,
           "--out", tmp_path / "big.json")
    run_ok(monkeypatch, capsys, "validate", tmp_path / "big.json")  # a valid plan file on its own
    code, _, lines = run_cli(monkeypatch, capsys, "validate", tmp_path / "big.json", "--model", tiny_dir)
    one_line_error(code, lines, "layers[0].budget is 1000000000000 tokens, more than model", "give at most")
