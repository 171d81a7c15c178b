"""Study: budgets per KV head instead of per layer, on the same DP and the same isolated-KL signal.

The per-layer plans of the README win where they keep the whole context in a few layers (7, 18, 23 at 512 tokens
a layer) and lose at 64-128 tokens, where one whole layer takes the total. SmolLM2 has 3 KV heads a layer (90 in
all): if the heads that need the whole context are fewer than the layers' heads, keeping only them whole leaves
budget for the rest. This script measures that, with nothing tuned on the eval data:

1. probes (calibration samples): for every KV head, policy and grid budget, only that head keeps its policy's
   top-b tokens (the other 89 keep everything); the KL to the full cache over the reference answer, teacher-forced
   (the `--layer-kl` probe of calibrate, one head instead of one layer). Resumable: one file a sample, named by
   its id and refused when made with other policies, grid or dtype.
2. the exact DP of `optimize` over the 90 heads (the plain mean over samples, as `--weighting mean`), total = budget x
   90 head-slots, i.e. the same memory as a per-layer plan of that average budget.
3. greedy answers of the per-head plans on an eval set; R against the full cache and the best uniform policy of
   an existing `evaluate` report on the same set (same model, dtype and engine, so the same baseline scores;
   `--check N` first re-answers N samples with a per-head copy of a uniform policy and compares answers).
   Also printed: the score per task, and the memory of each plan in tokens per layer, counted as KV entries
   (what a cache with one length per head holds: kvpress's AdaKV accounting) and as the dense layout of a
   transformers cache, where every head of a layer is padded to the layer's longest head.

The plans are written as one schema-2 plan file (`per_head.json`: a rung per budget, a policy and budget per KV
head), which `evaluate --plan`, PlanPress and apply_plan run in the ragged cache. Usage:
    python benchmarks/per_head_study.py --report outputs/s7/eval_task60/report.json --out outputs/s8/per_head
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from polykv_search.calibration.layer_kl import head_probes
from polykv_search.data import load_samples, spread_over_tasks
from polykv_search.data.metrics import score_sample
from polykv_search.engine import PrefillEngine, PrefillState
from polykv_search.io import write_atomic
from polykv_search.models import ModelInfo, load_model
from polykv_search.optimization import Problem, solve
from polykv_search.plan import HeadPlan, LayerPlan, Plan, PlanFile, SearchInfo

STUDY = SearchInfo(solver="per_head_study", status="study")


def head_layer(index: int, heads: list[HeadPlan]) -> LayerPlan:
    """A layer whose KV heads each keep their own policy and budget."""
    return LayerPlan(index=index, policy=None, heads=tuple(heads))


def per_head_plan(info: ModelInfo, heads: dict[int, list[HeadPlan]], average: float | None = None) -> Plan:
    """A plan from per-head entries of the compressible layers (missing layers keep their whole context)."""
    return Plan.build(info, average_budget=average, search=STUDY,
                      layers=[head_layer(idx, heads[idx]) if idx in heads else LayerPlan.full(idx)
                              for idx in info.compressible_layers])


def probe_sample(engine: PrefillEngine, state: PrefillState, policies: list[str], grid: list[int],
                 num_kv: int) -> torch.Tensor:
    """(L_c * H_kv, P, G) KL of compressing one head alone (calibrate --head-kl's probes, compressible layers
    only); 0 where the budget keeps the whole context."""
    info = engine.lm.info
    probes = head_probes(engine, state, info=info, policies=policies, budgets=grid)  # (L, H_kv, P, G)
    return probes[info.compressible_layers].reshape(-1, len(policies), len(grid))


def head_plan(info: ModelInfo, costs: np.ndarray, policies: list[str], grid: list[int], budget: int,
              num_kv: int) -> tuple[Plan, float]:
    """The exact DP over (layer, head) slots: a total of budget x slots KV entries."""
    layers = info.compressible_layers
    problem = Problem(costs, grid, list(range(costs.shape[0])), policies, total=budget * costs.shape[0])
    allocation = solve(problem, solver="dp")
    heads: dict[int, list[HeadPlan]] = {idx: [HeadPlan.full()] * num_kv for idx in layers}
    for slot in allocation.layers:
        heads[layers[slot.index // num_kv]][slot.index % num_kv] = HeadPlan.of(slot.policy, slot.budget)
    return per_head_plan(info, heads, average=budget), allocation.objective


def uniform(info: ModelInfo, policy: str, budget: int, num_kv: int) -> Plan:
    """One policy and budget in every head, written head by head (checks the per-head path against a report)."""
    return per_head_plan(info, {idx: [HeadPlan.of(policy, budget)] * num_kv for idx in info.compressible_layers},
                         average=budget)


def memory(plan: Plan, n: int, layers: list[int], num_kv: int) -> tuple[float, float]:
    """(KV entries, entries of the dense padded layout) per KV head, for a context of n tokens."""
    entries = padded = 0
    for idx in layers:
        kept = [n if c is None else min(c[1], n) for c in plan.layers[idx].head_choices(num_kv)]
        entries += sum(kept)
        padded += max(kept) * num_kv
    return entries / (len(layers) * num_kv), padded / (len(layers) * num_kv)


def task_mean(rows: list[tuple[str, float]]) -> float:
    by_task: dict[str, list[float]] = defaultdict(list)
    for task, value in rows:
        by_task[task].append(value)
    return statistics.fmean(statistics.fmean(v) for v in by_task.values())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default="calibration_data/calib.jsonl")
    ap.add_argument("--calib-samples", type=int, default=12)
    ap.add_argument("--calib-dtype", default="bfloat16")
    ap.add_argument("--policies", default="expected_attention_recent,h2o_recent")
    ap.add_argument("--grid", default="16,64,256,1024,2048")
    ap.add_argument("--budgets", default="64,128,256,512")
    ap.add_argument("--eval", default="calibration_data/eval.jsonl")
    ap.add_argument("--report", required=True, help="evaluate's report.json on --eval (full and uniform scores)")
    ap.add_argument("--eval-dtype", default="float32", help="the dtype the report was made in (CPU auto: float32)")
    ap.add_argument("--check", type=int, default=2, help="eval samples re-answered with a per-head uniform policy")
    ap.add_argument("--out", type=Path, default=Path("outputs/per_head"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    policies, grid = args.policies.split(","), [int(g) for g in args.grid.split(",")]
    budgets = [int(b) for b in args.budgets.split(",")]
    report = json.loads(Path(args.report).read_text())
    samples = load_samples(args.eval)
    if len(samples) != report["samples"]:
        sys.exit(f"--eval has {len(samples)} samples, the report {report['samples']}: give the report of --eval")
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"threads {torch.get_num_threads()}, cpus {os.cpu_count()}")

    # 1. probes on calibration samples, one file a sample (resumable; the model loads only for missing ones)
    calib = spread_over_tasks(load_samples(args.calib), args.calib_samples)
    made_with = {"policies": ",".join(policies), "grid": ",".join(map(str, grid)), "dtype": args.calib_dtype}
    paths = [args.out / f"probes_{sample.id}.safetensors" for sample in calib]
    for path in paths:
        if path.exists():
            with safe_open(str(path), "pt") as f:
                if f.metadata() != made_with:
                    sys.exit(f"{path} was made with {f.metadata()}, not {made_with}: use another --out")
    lm = engine = None
    for i, (sample, path) in enumerate(zip(calib, paths)):
        if path.exists():
            continue
        if engine is None:
            lm = load_model(args.model, dtype=args.calib_dtype)
            engine = PrefillEngine(lm, scorers=policies)
        start = time.perf_counter()
        costs = probe_sample(engine, engine.prefill(sample), policies, grid, lm.model.config.num_key_value_heads)
        write_atomic(path, lambda p, c=costs: save_file({"kl": c}, str(p), metadata=made_with))
        print(f"probes {i + 1}/{len(calib)} {sample.task}: {time.perf_counter() - start:.0f} s", flush=True)
    costs = np.mean([load_file(str(path))["kl"].numpy() for path in paths], axis=0)  # (units, P, G)

    # 3's model (the report's dtype); the probes' one when it is the same
    if lm is None or args.calib_dtype != args.eval_dtype:
        del engine, lm
        lm = load_model(args.model, dtype=args.eval_dtype)
    layers = lm.info.compressible_layers
    num_kv = lm.info.num_kv_heads

    # 2. the DP over heads
    plans = {}
    for budget in budgets:
        plan, objective = head_plan(lm.info, costs, policies, grid, budget, num_kv)
        plans[budget] = plan
        whole = [f"L{idx}H{h}" for idx in layers for h, head in enumerate(plan.layers[idx].heads)
                 if head.budget is not None and head.budget >= grid[-1]]
        print(f"budget {budget}: predicted KL sum {objective:.3f}; heads at the top level ({grid[-1]}): "
              f"{', '.join(whole) or 'none'}")
    plan_path = PlanFile.build(lm.info, list(plans.values())).save(args.out / "per_head.json")  # schema 2
    print(f"plans: {plan_path} (apply with PlanPress / apply_plan; evaluate --plan)")

    # 3. evaluate on the eval set (scorers: the plans' policies, and the checked uniform policy only when checking)
    known = {(r["sample_id"], r["method"]): r for r in report["results"]}
    best = {r["budget"]: (r["best_uniform"], r["best_uniform_score"], r["full_score"]) for r in report["recovery"]}
    check_key = f"{best[budgets[0]][0]}@{budgets[0]}"
    scored = list(dict.fromkeys(policies + ([best[budgets[0]][0]] if args.check > 0 else [])))
    engine = PrefillEngine(lm, scorers=scored)
    rows: dict[str, list[tuple[str, float]]] = defaultdict(list)
    sizes: dict[int, list[tuple[float, float]]] = defaultdict(list)
    answers = []
    start = time.perf_counter()
    for i, sample in enumerate(samples):
        state = engine.prefill(sample)
        methods = {f"per_head@{budget}": plan for budget, plan in plans.items()}
        for budget, plan in plans.items():
            sizes[budget].append(memory(plan, state.n_context, layers, num_kv))
        if i < args.check:
            methods[check_key] = uniform(lm.info, best[budgets[0]][0], budgets[0], num_kv)
        for key, result in zip(methods, engine.run_many(state, list(methods.values()), with_kl=False)):
            if key == check_key:
                theirs = known[(str(sample.id), check_key)]["answer"]
                print(f"check {sample.id} {check_key}: {'same answer' if theirs == result.answer else 'DIFFERS'}")
                continue
            score = score_sample(sample, result.answer)
            rows[key].append((sample.task, score))
            answers.append({"sample_id": str(sample.id), "task": sample.task, "method": key,
                            "answer": result.answer, "score": score})
        if (i + 1) % 10 == 0:
            print(f"eval {i + 1}/{len(samples)}: {time.perf_counter() - start:.0f} s", flush=True)
    write_atomic(args.out / f"answers_{Path(args.eval).stem}.jsonl",
                 "".join(json.dumps(a) + "\n" for a in answers))
    lines = ["| budget | full | best uniform | per-head plan | R | KV entries / dense layout (tokens per layer) |",
             "|---|---|---|---|---|---|"]
    rs = []
    for budget in budgets:
        name, uni, full = best[budget]
        score = task_mean(rows[f"per_head@{budget}"])
        r = (score - uni) / (full - uni)
        rs.append(r)
        entries, padded = (statistics.fmean(x) for x in zip(*sizes[budget]))
        lines.append(f"| {budget} | {full:.3f} | {name} {uni:.3f} | {score:.3f} | {r:+.2f} | "
                     f"{entries:.0f} / {padded:.0f} |")
    lines.append(f"\nmean R {statistics.fmean(rs):+.2f}\n")
    tasks = report["tasks"]
    lines += ["| budget | method | " + " | ".join(tasks) + " |", "|---|---|" + "---|" * len(tasks)]
    for budget in budgets:
        uniform_tasks = report["methods"][f"{best[budget][0]}@{budget}"]["tasks"]
        plan_tasks = {t: statistics.fmean(v for task, v in rows[f"per_head@{budget}"] if task == t) for t in tasks}
        for label, table in ((best[budget][0], uniform_tasks), ("per-head plan", plan_tasks)):
            lines.append(f"| {budget} | {label} | " + " | ".join(f"{table[t]:.2f}" for t in tasks) + " |")
    text = "\n".join(lines)
    print(text)
    write_atomic(args.out / f"result_{Path(args.eval).stem}.md", text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
