"""The calibrate command: a good run on a saved tiny model, and each bad input as one line with exit code 2."""

import json
import sys

import pytest

from polykv_search.calibration.profile import Profile
from polykv_search.cli import main
from polykv_search.data import loading
from tests.conftest import interruptible, sample_rows, write_jsonl


def run_cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["polykv-search", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_calibrate_writes_profile_and_heatmap(monkeypatch, capsys, tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", sample_rows(2))
    monkeypatch.setattr(sys, "argv", ["polykv-search", "calibrate", "--model", str(tiny_dir), "--data", str(data),
                                      "--out", str(tmp_path / "o"), "--budgets", "8,16,64", "--window", "16",
                                      "--json"])
    main()
    out = json.loads(capsys.readouterr().out)
    assert Profile.load(out["profile"]).num_samples == 2
    assert (tmp_path / "o" / "signals.png").read_bytes()[:4] == b"\x89PNG"


def test_the_scorers_registered_for_36_calibrate_when_named(monkeypatch, capsys, tiny_dir, tmp_path):
    names = "lagkv,curdkv,leverage,noncausal_attention,compactor,capkv,critical_snapkv,critical_expected_attention"
    data = write_jsonl(tmp_path / "d.jsonl", sample_rows(1))
    monkeypatch.setattr(sys, "argv", ["polykv-search", "calibrate", "--model", str(tiny_dir), "--data", str(data),
                                      "--out", str(tmp_path / "o"), "--budgets", "8,16,64", "--window", "16",
                                      "--policies", names, "--json"])
    main()
    profile = Profile.load(json.loads(capsys.readouterr().out)["profile"])
    assert list(profile.policies) == names.split(",") and profile.num_samples == 1


def test_long_sample_is_truncated_with_a_warning(monkeypatch, capsys, tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", sample_rows(1, words=600))
    monkeypatch.setattr(sys, "argv", ["polykv-search", "calibrate", "--model", str(tiny_dir), "--data", str(data),
                                      "--out", str(tmp_path / "o"), "--budgets", "8,16", "--window", "16",
                                      "--max-context", "300", "--json"])
    main()
    captured = capsys.readouterr()
    profile = Profile.load(json.loads(captured.out)["profile"])
    assert profile.header["samples"][0]["truncated"] is True
    assert "cut in the middle" in captured.err


def bad_cases(tmp_path, tiny_dir):
    good = write_jsonl(tmp_path / "good.jsonl", sample_rows(1))
    malformed = tmp_path / "bad.jsonl"
    malformed.write_text(json.dumps(sample_rows(1)[0]) + "\n{not json\n")
    missing_col = write_jsonl(tmp_path / "nocontext.jsonl", [{k: v for k, v in sample_rows(1)[0].items()
                                                             if k != "context"}])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    garbage_gguf = tmp_path / "broken.gguf"
    garbage_gguf.write_bytes(b"GGUF" + b"\x00" * 64)
    return {
        "unknown model": (["--model", "no-such-model", "--data", good], "unknown model"),
        "missing folder": (["--model", str(tmp_path / "nope" / "model"), "--data", good], "model"),
        "unreadable gguf": (["--model", garbage_gguf, "--data", good], "cannot read GGUF"),
        "missing data": (["--model", tiny_dir, "--data", tmp_path / "none.jsonl"], "does not exist"),
        "malformed line": (["--model", tiny_dir, "--data", malformed], "bad.jsonl:2: malformed JSON line"),
        "missing column": (["--model", tiny_dir, "--data", missing_col], "context"),
        "empty data": (["--model", tiny_dir, "--data", empty], "empty"),
        "budget below 1": (["--model", tiny_dir, "--data", good, "--budgets", "0,16"], "at least 1"),
        "budget not a number": (["--model", tiny_dir, "--data", good, "--budgets", "8,x"], "integers"),
        "unknown policy": (["--model", tiny_dir, "--data", good, "--policies", "snapkv,bogus"], "known policies"),
    }


CASES = ["unknown model", "missing folder", "unreadable gguf", "missing data", "malformed line", "missing column",
         "empty data", "budget below 1", "budget not a number", "unknown policy"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_exit_2_and_nothing_written(case, monkeypatch, capsys, tiny_dir, tmp_path):
    monkeypatch.delenv("POLYKV_DEBUG", raising=False)
    monkeypatch.setattr(loading, "_warned_tasks", set())  # the rows' task warns, as in a fresh process
    args, expected = bad_cases(tmp_path, tiny_dir)[case]
    out_dir = tmp_path / "out"
    code, _, err = run_cli(monkeypatch, capsys, "calibrate", *args, "--out", out_dir)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert expected.lower() in lines[0].lower()
    assert "Traceback" not in err
    assert not (out_dir / "profile.safetensors").exists()


def test_a_data_warning_is_said_once_work_starts(monkeypatch, capsys, tiny_dir, tmp_path):
    """Held back while the inputs are checked (so a refusal stays one line), said when calibration starts."""
    monkeypatch.setattr(loading, "_warned_tasks", set())
    data = write_jsonl(tmp_path / "d.jsonl", sample_rows(1))
    monkeypatch.setattr(sys, "argv", ["polykv-search", "calibrate", "--model", str(tiny_dir), "--data", str(data),
                                      "--out", str(tmp_path / "o"), "--budgets", "8,16", "--window", "16", "--json"])
    main()
    err = capsys.readouterr().err
    assert err.count("is not a built-in task") == 1, err


def test_debug_variable_shows_the_traceback(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("POLYKV_DEBUG", "1")
    code, _, err = run_cli(monkeypatch, capsys, "calibrate", "--data", tmp_path / "none.jsonl")
    assert code == 2 and "Traceback" in err


def test_layer_kl_flag_adds_the_isolated_kl_costs(monkeypatch, capsys, tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", sample_rows(1))
    monkeypatch.setattr(sys, "argv", ["polykv-search", "calibrate", "--model", str(tiny_dir), "--data", str(data),
                                      "--out", str(tmp_path / "o"), "--budgets", "8,16", "--window", "16",
                                      "--policies", "snapkv,streaming", "--layer-kl", "--json"])
    main()
    profile = Profile.load(json.loads(capsys.readouterr().out)["profile"])
    assert profile.cost_kinds == ["mass_lost", "out_err", "layer_kl", "layer_nll"]
    assert profile.arrays["layer_kl"].shape[2:] == profile.arrays["layer_nll"].shape[2:] == (1, 2, 2)


def test_merge_profiles_joins_grids_and_refuses_overlaps_in_one_line(monkeypatch, capsys, tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", sample_rows(1))
    paths = []
    for name, grid in (("a", "8"), ("b", "16,32")):
        monkeypatch.setattr(sys, "argv", ["polykv-search", "calibrate", "--model", str(tiny_dir), "--data", str(data),
                                          "--out", str(tmp_path / name), "--budgets", grid, "--window", "16",
                                          "--policies", "snapkv", "--json"])
        main()
        paths.append(json.loads(capsys.readouterr().out)["profile"])
    monkeypatch.setattr(sys, "argv", ["polykv-search", "merge-profiles", *paths, "--out", str(tmp_path / "m.st")])
    main()
    assert "budgets 8,16,32" in capsys.readouterr().out
    assert Profile.load(tmp_path / "m.st").budgets == [8, 16, 32]
    code, _, err = run_cli(monkeypatch, capsys, "merge-profiles", paths[0], paths[0], "--out", tmp_path / "x")
    assert code == 2 and "more than one profile" in err and len(err.strip().splitlines()) == 1


def test_around_flag_adds_operating_point_costs_that_optimize_uses(monkeypatch, capsys, tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", sample_rows(1))
    monkeypatch.setattr(sys, "argv", ["polykv-search", "calibrate", "--model", str(tiny_dir), "--data", str(data),
                                      "--out", str(tmp_path / "o"), "--budgets", "8,16,32", "--window", "16",
                                      "--policies", "snapkv,streaming", "--around", "16", "--json"])
    main()
    path = json.loads(capsys.readouterr().out)["profile"]
    profile = Profile.load(path)
    assert profile.cost_kinds == ["mass_lost", "out_err", "around_kl"] and profile.around_budgets == [16]
    monkeypatch.setattr(sys, "argv", ["polykv-search", "optimize", "--profile", path, "--budget", "16", "--cost",
                                      "around_kl", "--out", str(tmp_path / "plan.json"), "--json"])
    main()
    capsys.readouterr()
    assert (tmp_path / "plan.json").exists()
    code, _, err = run_cli(monkeypatch, capsys, "optimize", "--profile", path, "--budget", "32", "--cost",
                           "around_kl", "--out", tmp_path / "p32.json")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "--around 32" in lines[0], err
    # the refinement loop: probe around that plan, optimize again
    monkeypatch.setattr(sys, "argv", ["polykv-search", "calibrate", "--model", str(tiny_dir), "--data", str(data),
                                      "--out", str(tmp_path / "o2"), "--budgets", "8,16,32", "--window", "16",
                                      "--policies", "snapkv,streaming", "--around-plan", str(tmp_path / "plan.json"),
                                      "--json"])
    main()
    refined_path = json.loads(capsys.readouterr().out)["profile"]
    refined = Profile.load(refined_path)
    assert refined.around_budgets == [16] and refined.header["around"][0]["name"] == "plan"
    monkeypatch.setattr(sys, "argv", ["polykv-search", "optimize", "--profile", refined_path, "--budget", "16",
                                      "--cost", "around_kl", "--max-changes", "1", "--out", str(tmp_path / "r.json"),
                                      "--json"])
    main()
    (rung,) = json.loads(capsys.readouterr().out)["plans"]
    assert rung["solver"] == "refine" and "at most 1 layers changed" in rung["notes"]
    code, _, err = run_cli(monkeypatch, capsys, "optimize", "--profile", refined_path, "--budget", "16",
                           "--max-changes", "1", "--out", tmp_path / "bad.json")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "--cost around_kl" in lines[0], err
    code, _, err = run_cli(monkeypatch, capsys, "optimize", "--profile", refined_path, "--budget", "16", "--cost",
                           "around_kl", "--max-changes", "1", "--floor", "8", "--out", tmp_path / "bad.json")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "--floor would be ignored" in lines[0], err
    assert not (tmp_path / "bad.json").exists()
    code, _, err = run_cli(monkeypatch, capsys, "calibrate", "--model", tiny_dir, "--data", data, "--out",
                           tmp_path / "o3", "--around-plan", tmp_path / "nope.json")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1 and "nope.json" in lines[0], err


def test_ctrl_c_exits_130_with_one_line_and_resume_finishes(tiny_dir, tmp_path):
    """A script `calibrate && optimize` must stop at an interrupt: exit 130, one line, checkpoints kept."""
    import os
    import signal
    import subprocess
    import time

    data = write_jsonl(tmp_path / "d.jsonl", sample_rows(20, words=200))
    out = tmp_path / "o"
    args = [sys.executable, "-m", "polykv_search", "calibrate", "--model", str(tiny_dir), "--data", str(data),
            "--out", str(out), "--budgets", "8,16", "--window", "16"]
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            preexec_fn=interruptible,
                            env={**os.environ, "POLYKV_DEBUG": "0"})
    deadline = time.time() + 120
    while not list((out / "checkpoints").glob("sample-*")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 130, err
    assert any(line.startswith("interrupted; re-run with --resume") for line in lines), err
    assert not (out / "profile.safetensors").exists() and list((out / "checkpoints").glob("sample-*"))
    done = subprocess.run([*args, "--resume", "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert Profile.load(out / "profile.safetensors").num_samples == 20


@pytest.mark.parametrize("args", [["calibrate", "--max-samples", "abc"], ["nosuch"], ["validate"],
                                  ["baseline", "--kind", "uniform"]])
def test_usage_errors_are_one_line_and_exit_2(monkeypatch, capsys, args):
    code, _, err = run_cli(monkeypatch, capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "--help" in lines[0], err


def test_no_arguments_show_the_help(monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys)
    assert code == 2 and "calibrate" in out + err


@pytest.mark.parametrize("name", ["qfilter", "kvzap", "fastkvzip", "expected_attention_stats", "dms", "kvzip"])
def test_a_kvpress_press_polykv_does_not_run_is_refused_in_one_line_before_the_model_loads(monkeypatch, capsys,
                                                                                           tmp_path, name):
    import polykv_search.api as api

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(api, "resolve_model", load)
    data = write_jsonl(tmp_path / "d.jsonl", sample_rows(1))
    code, _, err = run_cli(monkeypatch, capsys, "calibrate", "--model", tmp_path / "m", "--data", data,
                           "--policies", f"snapkv,{name}", "--out", tmp_path / "out")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert f"policy {name!r} is not available: " in lines[0] and "registered policies: snapkv" in lines[0]
    if name in ("qfilter", "kvzap", "fastkvzip", "expected_attention_stats"):
        assert "from the Hugging Face hub" in lines[0]  # it says it needs downloaded weights or statistics
    assert not (tmp_path / "out").exists()


def test_an_unknown_policy_lists_the_registered_ones(monkeypatch, capsys, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", sample_rows(1))
    code, _, err = run_cli(monkeypatch, capsys, "calibrate", "--model", tmp_path / "m", "--data", data,
                           "--policies", "snapkv,lagkvv", "--out", tmp_path / "out")
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1, err
    assert "unknown policy 'lagkvv'; known policies: snapkv, streaming" in lines[0]
    assert all(name in lines[0] for name in ("lagkv", "curdkv", "leverage", "noncausal_attention", "compactor",
                                             "capkv"))
