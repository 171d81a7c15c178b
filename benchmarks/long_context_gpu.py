"""Benchmark: the long-context comparison on a GPU: long samples of 8k-32k tokens, then `polykv-search run`
(calibrate, optimize, guard, evaluate) at budgets 128-1024 with --device cuda; everything under outputs/long_gpu/.

    python benchmarks/long_context_gpu.py --device cuda                         # gemma3-270m (32k context), 8k-32k
    python benchmarks/long_context_gpu.py --device cuda --model smollm2-135m --long-tokens 6000,8000
    python benchmarks/long_context_gpu.py --dry-run                             # samples and the command, no GPU

Samples are the generator's long split (`--only-long`), measured in the evaluated model's tokens and written to
<out>/data/long.jsonl, with the long calibration split the generator makes from the text long.jsonl leaves,
<out>/data/calib_long.jsonl, at the same lengths (kept when their manifest entries match the request: "take" rather
than generate). The plan is calibrated on calibration_data/calib.jsonl and that long split, a rung per length as the
default `run` makes it (docs/long-context.md), and compared with the same uniform policies at the same budgets. SmolLM2 reads 8,192 tokens: for 8k-32k the default model is the
embedded Gemma-3-270M (32,768), or any local model folder with a long enough context.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from polykv_search.data.generate import CALIB_LONG_FILE, LONG_FILE, generate_long, parse_token_range
from polykv_search.errors import PolykvError
from polykv_search.models import model_slug

POLICIES = "streaming,snapkv,h2o_recent,tova_recent,expected_attention_recent"  # the CPU table's
BUDGETS = "128,256,512,1024"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmarks/long_context_gpu.py",
                                     description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=["cuda"], help="the comparison runs on a CUDA GPU only")
    parser.add_argument("--model", default="gemma3-270m", help="alias, .gguf file or local model folder")
    parser.add_argument("--long-tokens", default="8000,32000", help="MIN,MAX context tokens, in the model's tokens")
    parser.add_argument("--per-task", type=int, default=2, help="long samples per task family")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budgets", default=BUDGETS)
    parser.add_argument("--policies", default=POLICIES, help="uniform policies to compare the plan with")
    parser.add_argument("--calib", default="calibration_data/calib.jsonl")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--out", type=Path, default=Path("outputs/long_gpu"))
    parser.add_argument("--dry-run", action="store_true", help="write the samples and print the command; no GPU")
    return parser.parse_args(argv)


def run_command(args: argparse.Namespace, data: Path) -> list[str]:
    """The `polykv-search run` command line of the comparison."""
    return [sys.executable, "-m", "polykv_search", "run", "--model", args.model, "--budget", args.budgets,
            "--calib", args.calib, "--calib", str(data.parent / CALIB_LONG_FILE), "--eval", str(data),
            "--compare", args.policies, "--device", args.device,
            "--dtype", args.dtype, "--out", str(args.out / model_slug(args.model))]


def long_samples(args: argparse.Namespace) -> Path:
    """<out>/data/long.jsonl at the requested lengths: the one there when its manifest says it is that request,
    else generated."""
    folder = args.out / "data"
    tokens = parse_token_range(args.long_tokens)
    manifest = folder / "manifest.json"
    if (folder / LONG_FILE).exists() and (folder / CALIB_LONG_FILE).exists() and manifest.exists():
        splits = json.loads(manifest.read_text()).get("splits", {})
        entry = splits.get("long", {})
        if (entry.get("token_range") == list(tokens) and entry.get("seed") == args.seed
                and entry.get("tokenizer", {}).get("model") == args.model
                and set(entry.get("per_task", {}).values()) == {args.per_task} and "calib_long" in splits):
            return folder / LONG_FILE
    return generate_long(folder, seed=args.seed, per_family=args.per_task, tokens=tokens, tokenizer=args.model)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.dry_run:
        import torch  # imported here: --dry-run and --help need no torch

        if not torch.cuda.is_available():
            print("error: no CUDA device (torch.cuda.is_available() is False); run this on a GPU machine, "
                  "or pass --dry-run to write the samples and print the command", file=sys.stderr)
            return 2
    try:
        data = long_samples(args)
    except PolykvError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    command = run_command(args, data)
    print(f"samples: {data}")
    print(shlex.join(command))
    if args.dry_run:
        return 0
    return subprocess.run(command, check=False).returncode


if __name__ == "__main__":
    raise SystemExit(main())
