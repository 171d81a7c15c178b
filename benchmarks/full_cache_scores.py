"""Full-cache baseline: greedy-decode every sample of the given splits with no KV compression and score it.

Usage:
    python benchmarks/full_cache_scores.py calibration_data/calib.jsonl calibration_data/eval.jsonl \
        --out calibration_data/full_cache_scores.md --predictions outputs/full_cache_predictions.jsonl

Prints one Markdown table per split (task, n, mean score, context-token min/median/max) and writes them,
with the command, date and model, to --out. A task whose full-cache score is near 0 cannot show what
compression loses: fix the task, not the plan.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import shlex
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

from polykv_search.data import build_prompt, load_samples
from polykv_search.data.metrics import metric_for, score_sample
from polykv_search.io import write_atomic
from polykv_search.models import load_model


def run_split(lm, path: Path, *, limit: int | None, add_bos: bool | None) -> list[dict]:  # type: ignore[no-untyped-def]
    samples = load_samples(path, limit=limit)
    rows = []
    for i, sample in enumerate(samples):
        parts = build_prompt(sample, lm.tokenizer, max_context_tokens=lm.info.max_context, add_bos=add_bos)
        ids = torch.tensor([parts.prompt_ids], device=lm.device)  # (1, T)
        started = time.perf_counter()
        with torch.no_grad():
            out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=parts.max_new_tokens,
                                    do_sample=False, pad_token_id=lm.tokenizer.eos_token_id)
        prediction = lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        score = score_sample(sample, prediction)
        rows.append({"split": path.stem, "id": sample.id, "task": sample.task, "context_tokens": len(parts.context_ids),
                     "question_tokens": len(parts.question_ids), "truncated": parts.truncated,
                     "prediction": prediction, "answers": list(sample.answers), "score": score,
                     "seconds": round(time.perf_counter() - started, 2)})
        print(f"[{path.stem} {i + 1}/{len(samples)}] {sample.task:24s} {len(parts.prompt_ids):5d} tok "
              f"score={score:.2f} ({rows[-1]['seconds']:.1f}s) pred={prediction[:60]!r}", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict]) -> str:
    by_task: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_task[row["task"]].append(row)
    lines = ["| task | metric | n | mean score | context tokens min / median / max |",
             "|---|---|---|---|---|"]
    for task, items in by_task.items():
        tokens = [r["context_tokens"] for r in items]
        lines.append(f"| {task} | {metric_for(task)} | {len(items)} | {statistics.fmean(r['score'] for r in items):.3f} "
                     f"| {min(tokens)} / {statistics.median(tokens):.0f} / {max(tokens)} |")
    tokens = [r["context_tokens"] for r in rows]
    task_means = [statistics.fmean(r["score"] for r in items) for items in by_task.values()]
    lines.append(f"| **all (mean over samples)** | | {len(rows)} | {statistics.fmean(r['score'] for r in rows):.3f} "
                 f"| {min(tokens)} / {statistics.median(tokens):.0f} / {max(tokens)} |")
    lines.append(f"| **all (mean over tasks)** | | {len(by_task)} tasks | {statistics.fmean(task_means):.3f} | |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="+", type=Path, help="LongBench-schema .jsonl files (one table each)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--limit", type=int, default=None, help="first N samples of each file")
    parser.add_argument("--add-bos", choices=["auto", "yes", "no"], default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    parser.add_argument("--out", type=Path, default=None, help="write the Markdown report here")
    parser.add_argument("--predictions", type=Path, default=None, help="write per-sample predictions (JSON lines)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the weight-loading bar floods the log this script writes
    if args.threads:
        torch.set_num_threads(args.threads)
    add_bos = {"auto": None, "yes": True, "no": False}[args.add_bos]
    started = time.perf_counter()
    lm = load_model(args.model)
    report = [
        "# Full-cache scores",
        "",
        f"- command: `{' '.join(shlex.quote(a) for a in ['python', *sys.argv])}`",
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        (f"- model: {lm.info.model_id} (revision {lm.info.revision[:16]}, {lm.info.architecture}, "
         f"{next(lm.model.parameters()).dtype}, {lm.device})"),
        (f"- decoding: greedy, full KV cache, per-task max_new_tokens; torch {torch.__version__}, "
         f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs"),
        "- context tokens: length of the compressible part (chat header + instruction + context) in model tokens",
        "",
    ]
    all_rows = []
    for path in args.data:
        rows = run_split(lm, path, limit=args.limit, add_bos=add_bos)
        all_rows.extend(rows)
        section = f"## {path.name}\n\n{table(rows)}\n"
        print(section, flush=True)
        report.append(section)
    report.append(f"Total model time: {time.perf_counter() - started:.0f} s for {len(all_rows)} samples.\n")
    if args.out:
        write_atomic(args.out, "\n".join(report))
    if args.predictions:
        write_atomic(args.predictions, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in all_rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
