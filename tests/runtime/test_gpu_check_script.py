"""benchmarks/gpu_check.py without a GPU, run as a script (as a user runs it): its dry run goes through calibrate,
optimize, evaluate, the decode measurements and the answers check on the CPU and writes every figure, and without
CUDA a real run stops in one line before any work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import sample_rows, tiny_loaded, write_jsonl

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def script(*argv: str) -> subprocess.CompletedProcess:
    """The benchmark in a fresh interpreter, importing this tree's package."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.run([sys.executable, str(SCRIPT), *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is here: the script would run for real")
def test_without_cuda_it_stops_in_one_line_before_any_work(tmp_path):
    done = script("--model", "nope", "--out", str(tmp_path / "check.json"))
    assert done.returncode == 2 and done.stdout == ""
    err = done.stderr.strip()
    assert err.startswith("error: no CUDA device") and "--dry-run" in err and "\n" not in err
    assert not any(tmp_path.iterdir())


def test_dry_run_measures_every_stage_and_writes_the_figures(tmp_path):
    lm = tiny_loaded("llama")  # a local model folder, as a user passes one, reading 512 tokens
    lm.model.config.max_position_embeddings = 512
    lm.model.save_pretrained(tmp_path / "tiny")
    lm.tokenizer.save_pretrained(tmp_path / "tiny")
    data = write_jsonl(tmp_path / "rows.jsonl", sample_rows(3, words=120))
    out = tmp_path / "check.json"
    done = script("--dry-run", "--model", str(tmp_path / "tiny"), "--data", str(data), "--contexts", "200,5000",
                  "--budgets", "16", "--decode", "3", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["dry_run"] and report["device"] == "cpu (no GPU visible)" and report["dtype"] == "float32"
    assert len(report["notes"]) == 1 and "exceed the 512-token context" in report["notes"][0]  # 5000: capped
    assert [c["context"] for c in report["contexts"]] == [200, 512 - 64]  # room for the needle task's answer
    for ctx in report["contexts"]:
        tokens = ctx["prompt_tokens"]["calibration"] + ctx["prompt_tokens"]["held_out"]
        assert len(tokens) == 2 and all(ctx["context"] - 8 <= n <= ctx["context"] for n in tokens), tokens
        assert set(ctx["stages"]) == {"calibrate", "optimize", "evaluate", "answers@16"}
        assert all(s["seconds"] >= 0 and s["peak_gpu_mb"] is None for s in ctx["stages"].values())
        assert [row["budget"] for row in ctx["evaluate"]] == [16]
        measured = {(row["kind"].split()[0], row["budget"], row["batch"]) for row in ctx["decode"]}
        assert measured == {("dense", None, 1), ("dense", None, 8)} | {
            (kind, b, batch) for kind in ("plan", "uniform") for b in (16,) for batch in (1, 8)}
        assert all("failed" not in row and row["decode_tokens_per_s"] > 0 for row in ctx["decode"]), ctx["decode"]
        assert all(a["of"] == 1 and a["same"] == 1 for a in ctx["answers"].values())
    shown = done.stdout
    for part in ("on cpu (no GPU visible), dtype float32", "stage", "calibrate", "decode", "tokens/s",
                 "ragged = dense masked greedy answers, per budget: 16: 1/1", f"written: {out}"):
        assert part in shown, part
