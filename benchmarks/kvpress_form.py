"""Full-cache scores of the needle tasks written in kvpress's form (RULER-style rows: context and question with
their instructions, `answer_prefix`, `max_new_tokens`, `task`), read three ways, side by side in one run.

Usage:
    python benchmarks/kvpress_form.py --data calibration_data/eval.jsonl --per-task 4 --out outputs/kvpress_form

1. built-in: the LongBench-form rows with polykv-search's own needle template;
2. kvpress form: the same rows written as kvpress ships its data sets and loaded with `load_samples` (no column
   map); the prompt must be token-identical to 1, so must the answers;
3. kvpress form read as before (question mapped to input, the row's answer prefix and answer room ignored,
   the task unknown): the generic read-then-answer prompt, scored with the row's own metric.

Writes the kvpress-form file (`ruler_style.jsonl`) and a Markdown table (`kvpress_form.md`) under --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import statistics
import sys
from pathlib import Path

import torch

from polykv_search.data import Sample, build_prompt, load_samples, to_kvpress_form
from polykv_search.data.generate import write_jsonl
from polykv_search.data.metrics import score_answer
from polykv_search.io import write_atomic
from polykv_search.models import load_model

NEEDLE_TASKS = ("niah_single", "niah_multikey", "variable_tracking")


def answer(lm, sample: Sample) -> tuple[str, list[int]]:  # type: ignore[no-untyped-def]
    parts = build_prompt(sample, lm.tokenizer, max_context_tokens=lm.info.max_context)
    ids = torch.tensor([parts.prompt_ids], device=lm.device)  # (1, T)
    with torch.no_grad():
        out = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=parts.max_new_tokens,
                                do_sample=False, pad_token_id=lm.tokenizer.eos_token_id)
    return lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), parts.prompt_ids


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("calibration_data/eval.jsonl"))
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--per-task", type=int, default=4, help="samples of each needle task")
    parser.add_argument("--out", type=Path, default=Path("outputs/kvpress_form"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    built_in = [s for task in NEEDLE_TASKS for s in [s for s in load_samples(args.data) if s.task == task]
                [: args.per_task]]
    path = write_jsonl(args.out / "ruler_style.jsonl", [to_kvpress_form(s) for s in built_in])
    kvpress = load_samples(path)
    before = [dataclasses.replace(s, templated=False, answer_prefix=None, max_new_tokens=None, task=path.stem)
              for s in kvpress]
    lm = load_model(args.model)
    scores: dict[str, dict[str, list[float]]] = {task: {"built-in": [], "kvpress": [], "before": []}
                                                 for task in NEEDLE_TASKS}
    identical = 0
    for original, row, old in zip(built_in, kvpress, before, strict=True):
        got = {}
        for name, sample in (("built-in", original), ("kvpress", row), ("before", old)):
            prediction, ids = answer(lm, sample)
            got[name] = ids
            score = score_answer(original.task, prediction, list(original.answers))
            scores[original.task][name].append(score)
            print(f"{original.id:28s} {name:9s} score={score:.2f} pred={prediction[:50]!r}", file=sys.stderr)
        identical += got["built-in"] == got["kvpress"]
    lines = [f"command: `{' '.join(shlex.quote(a) for a in ['python', *sys.argv])}`; model {lm.info.model_id}, "
             f"greedy, full cache; {identical}/{len(built_in)} kvpress-form prompts token-identical to the "
             "built-in ones", "",
             "| task | n | built-in rows | kvpress form | kvpress form read as before |", "|---|---|---|---|---|"]
    for task, by_form in scores.items():
        lines.append(f"| {task} | {len(by_form['built-in'])} | " +
                     " | ".join(f"{statistics.fmean(by_form[k]):.2f}" for k in ("built-in", "kvpress", "before")) + " |")
    means = {k: statistics.fmean(v for t in scores.values() for v in t[k]) for k in ("built-in", "kvpress", "before")}
    lines.append(f"| **all** | {len(built_in)} | " + " | ".join(f"{means[k]:.2f}" for k in means) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_atomic(args.out / "kvpress_form.md", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
