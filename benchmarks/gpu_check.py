"""Benchmark: one prepared GPU check of the whole product at long contexts: per context length, calibrate (the default
recipe: a policy and budget per KV head, --head-fisher costs) -> optimize (a budget ladder) -> evaluate (full cache vs
the plan vs the uniform policies), each stage's wall time and peak GPU memory; then greedy decoding tokens/s at batch 1
and 8 with the plan applied (`apply_plan` + `model.generate`, the ragged per-head cache) against the same model with
no plan (the dense full cache) and a uniform dense press at the same budget; and whether the plan's greedy answers
through the ragged cache (PlanPress in kvpress's pipeline) equal the dense masked reference's (the evaluation engine).

    python benchmarks/gpu_check.py                                            # smollm2-135m, 8k (its context)
    python benchmarks/gpu_check.py --model gemma3-270m                        # 8k, 16k, 32k tokens
    python benchmarks/gpu_check.py --model /models/Llama-3.1-8B-Instruct --contexts 8192,32768
    python benchmarks/gpu_check.py --dry-run                                  # the whole flow on the CPU, tiny

Prompts are made to each length from --data rows (default calibration_data/long.jsonl, 6.5k-7.5k tokens): a row's
own context stays whole at the end, next to its question, and text from the other rows' contexts is put before it
until the prompt (context and question, in the model's tokens) reaches the length; a longer row is cut in the
middle as --max-context cuts it. The token counts printed are the prompts' real ones. Lengths past the model's
context are capped to it, with a note. Without CUDA it refuses in one line (exit 2) unless --dry-run. Figures go to
--out as JSON; a failed decode measurement (batch 8 before the ragged cache takes batches) is one line, not a stop.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

DEMO_COMPARE = "streaming,snapkv,h2o_recent,tova_recent,expected_attention_recent"  # the Makefile demo's
# (real run, dry run): the dry run is the same flow at sizes two CPU cores finish in seconds
DEFAULTS = {"contexts": ("8192,16384,32768", "256"), "samples": (4, 1), "eval_samples": (4, 1),
            "budgets": ("128,512", "32"), "compare": (DEMO_COMPARE, "streaming,snapkv"), "decode": (64, 4),
            "repeats": (3, 1)}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmarks/gpu_check.py", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m", help="embedded alias, .gguf file, local folder or hub id")
    parser.add_argument("--data", default="calibration_data/long.jsonl", help="rows the prompts are made from")
    parser.add_argument("--contexts", help="prompt lengths in tokens (default 8192,16384,32768; dry run 256)")
    parser.add_argument("--samples", type=int, help="calibration samples per length (default 4; dry run 1)")
    parser.add_argument("--eval-samples", type=int, help="held-out samples per length (default 4; dry run 1)")
    parser.add_argument("--budgets", help="average tokens per KV head, a ladder (default 128,512; dry run 32)")
    parser.add_argument("--compare", help=f"uniform policies to evaluate (default {DEMO_COMPARE})")
    parser.add_argument("--batches", default="1,8", help="batch sizes of the decode measurement")
    parser.add_argument("--decode", type=int, help="greedy tokens decoded per measurement (default 64; dry run 4)")
    parser.add_argument("--repeats", type=int, help="decode measurements per setting, the median kept (default 3)")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on a GPU, float32 on the CPU), float32, ...")
    parser.add_argument("--out", type=Path, help="the JSON of every figure (default outputs/gpu_check/<model>.json)")
    parser.add_argument("--dry-run", action="store_true", help="the whole flow on the CPU at tiny sizes")
    args = parser.parse_args(argv)
    for name, (real, dry) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, dry if args.dry_run else real)
    return args


def parse_ints(text: str) -> list[int]:
    return [int(part) for part in str(text).split(",") if part.strip()]


class StepClock:
    """A logits processor that notes the time of every generation step: the first step ends the prefill, the rest
    are decoding (synchronised, so a GPU's queued work is counted where it belongs)."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.sync = sync
        self.times: list[float] = []

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        self.sync()
        self.times.append(time.perf_counter())
        return scores


class Check:
    """The model, its device and the figures, with the stage timer."""

    def __init__(self, lm: Any, cuda: bool) -> None:
        import torch

        self.lm, self.cuda, self.torch = lm, cuda, torch

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()

    @contextmanager
    def stage(self, into: dict[str, Any], name: str) -> Iterator[None]:
        """Wall time and peak GPU memory (reset at the start) of the block, into `into[name]`."""
        if self.cuda:
            self.torch.cuda.reset_peak_memory_stats()
        self.sync()
        start = time.perf_counter()
        yield
        self.sync()
        into[name] = {"seconds": round(time.perf_counter() - start, 3),
                      "peak_gpu_mb": round(self.torch.cuda.max_memory_allocated() / 2**20, 1) if self.cuda else None}


def prompts_at(lm: Any, rows: list[Any], length: int) -> tuple[list[Any], int]:
    """`rows` as samples whose prompts (context and question) are about `length` tokens, and the max_context_tokens
    that keeps them so: a row's context at the end, the other rows' text before it; a longer row is left for the
    stages to cut in the middle."""
    from polykv_search.data import build_prompt
    from polykv_search.data.prompts import template_for_sample

    tokenizer = lm.tokenizer
    room = max(r.max_new_tokens or template_for_sample(r).max_new_tokens for r in rows)
    limit = length + room  # what each stage is told: the prompt within `length`, the answer's room after it
    out = []
    for k, row in enumerate(rows):
        own = len(build_prompt(row, tokenizer, max_context_tokens=10**9).prompt_ids)
        need = length - own
        if need <= 0:
            out.append(row)
            continue
        others = [r.context for r in rows[k + 1:] + rows[:k]] or [row.context]
        filler: list[int] = []
        while len(filler) < need:
            for text in others:
                filler += tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"]
        for _ in range(3):  # re-tokenizing at the joins shifts a few tokens: trim to the length
            sample = replace(row, context=tokenizer.decode(filler[:need]) + "\n\n" + row.context,
                             id=f"{row.id}@{length}")
            over = len(build_prompt(sample, tokenizer, max_context_tokens=10**9).prompt_ids) - length
            if over <= 0:
                break
            need -= over
        out.append(sample)
    return out, limit


def padded_batch(lm: Any, prompts: list[list[int]], batch: int) -> dict[str, Any]:
    """`batch` prompts (cycled), left-padded to the longest, with their attention mask, on the model's device."""
    import torch

    rows = [prompts[k % len(prompts)] for k in range(batch)]
    width = max(len(r) for r in rows)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return {"input_ids": ids.to(lm.device), "attention_mask": mask.to(lm.device), "pad_token_id": pad}


def decode_speed(check: Check, batch: dict[str, Any], plan: Any, *, steps: int, repeats: int) -> dict[str, Any]:
    """Greedy `generate` of `steps` tokens on `batch`, under `plan` (None: the dense full cache): prefill seconds,
    decoding tokens/s (every row's tokens after the first step), the medians of `repeats`, and peak GPU memory."""
    from transformers import LogitsProcessorList

    from polykv_search.runtime import apply_plan

    lm = check.lm
    prefill, speed, peak = [], [], 0.0
    for _ in range(repeats):
        clock = StepClock(check.sync)
        if check.cuda:
            check.torch.cuda.reset_peak_memory_stats()
        check.sync()
        start = time.perf_counter()
        with check.torch.inference_mode(), apply_plan(lm.model, plan) if plan is not None else nullcontext():
            lm.model.generate(**batch, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                              logits_processor=LogitsProcessorList([clock]))
        prefill.append(clock.times[0] - start)
        rows = batch["input_ids"].shape[0]
        speed.append(rows * (len(clock.times) - 1) / (clock.times[-1] - clock.times[0]))
        if check.cuda:
            peak = max(peak, check.torch.cuda.max_memory_allocated() / 2**20)
    return {"prefill_s": round(statistics.median(prefill), 4),
            "decode_tokens_per_s": round(statistics.median(speed), 2), "peak_gpu_mb": round(peak, 1) if check.cuda else None}


def answers_agree(check: Check, samples: list[Any], plan: Any, limit: int) -> dict[str, Any]:
    """The plan's greedy answers through the ragged cache (PlanPress in kvpress's pipeline) and through the dense
    masked reference (the evaluation engine: every head padded, the padding hidden per head)."""
    import torch
    from kvpress import KVPressTextGenerationPipeline

    from polykv_search.engine import PrefillEngine
    from polykv_search.runtime import PlanPress, polykv_attention

    lm = check.lm
    engine = PrefillEngine.for_plans(lm, [plan], max_context_tokens=limit)
    pipe = KVPressTextGenerationPipeline(model=lm.model, tokenizer=lm.tokenizer)
    rows = []
    for sample in samples:
        state = engine.prefill(sample)
        dense = engine.run(state, plan, with_kl=False).answer
        inputs = {"context_ids": torch.tensor([state.parts.context_ids], device=lm.device),
                  "questions_ids": [torch.tensor([state.parts.question_ids], device=lm.device)]}
        with torch.inference_mode(), polykv_attention(lm.model):
            ragged = pipe.forward(inputs, max_new_tokens=state.parts.max_new_tokens, press=PlanPress(plan))[0]
        rows.append({"sample": sample.id, "dense_masked": dense, "ragged": ragged, "same": dense == ragged})
    return {"same": sum(r["same"] for r in rows), "of": len(rows), "answers": rows}


def one_length(check: Check, args: argparse.Namespace, rows: list[Any], length: int, work: Path) -> dict[str, Any]:
    """Calibrate, optimize and evaluate at `length` tokens, then the decode speeds and the answers check."""
    import polykv_search as pk
    from polykv_search.calibration.modes import calibration_for_cost
    from polykv_search.calibration.profile import HEAD_FISHER
    from polykv_search.data import build_prompt
    from polykv_search.optimization.policy_sets import candidate_sets
    from polykv_search.plan import uniform_plan

    lm = check.lm
    budgets = parse_ints(args.budgets)
    calib_rows, eval_rows = rows[:args.samples], rows[args.samples:args.samples + args.eval_samples]
    samples, limit = prompts_at(lm, calib_rows + eval_rows, length)
    calib, held_out = samples[:len(calib_rows)], samples[len(calib_rows):]
    tokens = [len(build_prompt(s, lm.tokenizer, max_context_tokens=limit).prompt_ids) for s in samples]
    print(f"  {length} tokens: prompts of {', '.join(map(str, tokens))} tokens "
          f"({len(calib)} calibration, {len(held_out)} held out)")
    result: dict[str, Any] = {"context": length, "prompt_tokens": {"calibration": tokens[:len(calib)],
                                                                   "held_out": tokens[len(calib):]}, "stages": {}}
    config = pk.OptimizeConfig(cost=HEAD_FISHER)  # the default recipe (`run`'s), without its guard
    policies, policy_sets = candidate_sets(config, None, None, guard=False)
    if policy_sets:
        config = replace(config, policies=tuple(policy_sets[0]))
    with check.stage(result["stages"], "calibrate"):
        run = pk.calibrate(lm, calib, config=calibration_for_cost(HEAD_FISHER, budgets=budgets, policies=policies,
                                                                  max_context_tokens=limit), out_dir=work / "calib")
    with check.stage(result["stages"], "optimize"):
        plan_file = pk.optimize(run.profile, budgets=budgets, config=config)
    compare = args.compare.split(",")
    with check.stage(result["stages"], "evaluate"):
        report = pk.evaluate(lm, held_out, plans={"plan": plan_file}, budgets=budgets, policies=compare,
                             allocators=[], out_dir=work / "eval", max_context_tokens=limit)
    result["evaluate"] = [{"budget": r.budget, "full": r.full_score, "plan": r.score, "best_uniform": r.best_uniform,
                           "best_uniform_score": r.best_uniform_score, "R": r.R, "plan_kl": r.kl,
                           "best_uniform_kl": r.best_uniform_kl} for r in report.recovery_of("plan")]
    prompts = [build_prompt(s, lm.tokenizer, max_context_tokens=limit).prompt_ids for s in held_out or calib]
    result["decode"], result["answers"] = [], {}
    for budget in budgets:
        plan = plan_file.plan_for(budget)
        best = next((r["best_uniform"] for r in result["evaluate"] if r["budget"] == budget), None)
        uniform = uniform_policy(best, compare)
        kinds = {"dense": None, "plan": plan, f"uniform {uniform}": uniform_plan(lm.info, policy=uniform,
                                                                                   budget=budget)}
        for batch in parse_ints(args.batches):
            inputs = padded_batch(lm, prompts, batch)
            for kind, applied in kinds.items():
                if kind == "dense" and budget != budgets[0]:
                    continue  # the full cache does not depend on the budget: measured once
                entry = {"budget": None if kind == "dense" else budget, "batch": batch, "kind": kind}
                try:
                    entry.update(decode_speed(check, inputs, applied, steps=args.decode, repeats=args.repeats))
                except Exception as exc:  # noqa: BLE001 (one measurement failing is a figure, not a stop)
                    first = (str(exc).strip().splitlines() or [""])[0][:200]
                    entry["failed"] = f"{type(exc).__name__}: {first}"
                    print(f"  decode {kind} at {budget} tokens, batch {batch}: failed ({entry['failed']})")
                result["decode"].append(entry)
        with check.stage(result["stages"], f"answers@{budget}"):
            result["answers"][str(budget)] = answers_agree(check, held_out or calib, plan, limit)
    return result


def uniform_policy(best: str | None, compare: list[str]) -> str:
    """The policy of the best uniform method the evaluation named ('snapkv', or a key holding it), else the first."""
    for name in compare:
        if best and (best == name or best.startswith(f"{name}@") or best.startswith(f"uniform:{name}")):
            return name
    return compare[0]


def table(report: dict[str, Any]) -> str:
    """The figures as one compact text table per context length."""
    lines = [f"{report['model']} on {report['device']}, dtype {report['dtype']}"]
    for ctx in report["contexts"]:
        tokens = ctx["prompt_tokens"]["calibration"] + ctx["prompt_tokens"]["held_out"]
        lines.append(f"context {ctx['context']} (prompts {min(tokens)}-{max(tokens)} tokens)")
        lines.append(f"  {'stage':<14}{'seconds':>10}{'peak GPU MB':>14}")
        for name, stage in ctx["stages"].items():
            peak = "-" if stage["peak_gpu_mb"] is None else f"{stage['peak_gpu_mb']:.0f}"
            lines.append(f"  {name:<14}{stage['seconds']:>10.2f}{peak:>14}")
        lines.append(f"  {'budget':<8}{'full':>7}{'plan':>7}{'best uniform':>28}{'R':>7}")
        for row in ctx["evaluate"]:
            r = "-" if row["R"] is None else f"{row['R']:+.2f}"
            full = "-" if row["full"] is None else f"{row['full']:.3f}"
            lines.append(f"  {row['budget']:<8g}{full:>7}{row['plan']:>7.3f}"
                         f"{row['best_uniform'] + ' ' + format(row['best_uniform_score'], '.3f'):>28}{r:>7}")
        lines.append(f"  {'decode':<22}{'budget':>7}{'batch':>6}{'prefill s':>11}{'tokens/s':>10}{'peak GPU MB':>13}")
        for row in ctx["decode"]:
            budget = "-" if row["budget"] is None else f"{row['budget']:g}"
            if "failed" in row:
                lines.append(f"  {row['kind']:<22}{budget:>7}{row['batch']:>6}  failed: {row['failed'][:60]}")
                continue
            peak = "-" if row["peak_gpu_mb"] is None else f"{row['peak_gpu_mb']:.0f}"
            lines.append(f"  {row['kind']:<22}{budget:>7}{row['batch']:>6}{row['prefill_s']:>11.3f}"
                         f"{row['decode_tokens_per_s']:>10.1f}{peak:>13}")
        same = ", ".join(f"{b}: {a['same']}/{a['of']}" for b, a in ctx["answers"].items())
        lines.append(f"  ragged = dense masked greedy answers, per budget: {same}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device (torch.cuda.is_available() is False); run this on a GPU machine, or pass "
              "--dry-run for the whole flow on the CPU at tiny sizes", file=sys.stderr)
        return 2
    from polykv_search.data import load_samples
    from polykv_search.data.prompts import template_for_sample
    from polykv_search.errors import PolykvError
    from polykv_search.io import write_json_atomic
    from polykv_search.models import describe_device, load_model, model_slug

    device = "cpu" if args.dry_run else "cuda"
    out = args.out or Path("outputs/gpu_check") / f"{model_slug(args.model)}{'-dry' if args.dry_run else ''}.json"
    try:
        rows = load_samples(args.data)
        lm = load_model(args.model, device=device, dtype=args.dtype)
    except PolykvError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    dtype = str(next(lm.model.parameters()).dtype).removeprefix("torch.")
    report: dict[str, Any] = {"model": lm.info.model_id, "device": describe_device(device), "dtype": dtype,
                              "dry_run": args.dry_run, "data": str(args.data), "budgets": parse_ints(args.budgets),
                              "batches": parse_ints(args.batches), "decode_tokens": args.decode, "notes": [],
                              "contexts": []}
    print(f"{lm.info.model_id} on {report['device']}, dtype {dtype}")
    room = max(r.max_new_tokens or template_for_sample(r).max_new_tokens for r in rows)  # a capped prompt's answer fits
    lengths = []
    for length in parse_ints(args.contexts):
        if lm.info.max_context and length + room > lm.info.max_context:
            capped = lm.info.max_context - room
            note = f"{length} tokens exceed the {lm.info.max_context}-token context of {lm.info.model_id}: {capped}"
            report["notes"].append(note)
            print(f"note: {note}")
            length = capped
        if length not in lengths:
            lengths.append(length)
    check = Check(lm, cuda=device == "cuda")
    with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
        for length in lengths:
            report["contexts"].append(one_length(check, args, rows, length, Path(tmp) / str(length)))
            write_json_atomic(out, report)  # each length's figures kept as soon as it is measured
    print(table(report))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
