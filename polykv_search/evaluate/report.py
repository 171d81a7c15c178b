"""The evaluation report: per task and overall scores and KL per method, gap recovery R per budget, as JSON,
a Markdown table and a PNG of score against budget.

R = (S_plan - S_best_uniform) / (S_full - S_best_uniform), all on the same samples; S is the mean over tasks
of the per-task mean score (LongBench's convention), S_best_uniform the best single policy at that budget.
Each R comes with a 90% paired bootstrap interval: the samples are redrawn with replacement within each task
(the best uniform policy stays the one chosen on all samples), so a difference inside it is noise.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from polykv_search.evaluate.engine import Method
from polykv_search.evaluate.run import ScoredResult
from polykv_search.io import write_atomic, write_json_atomic


def summarize(results: Sequence[ScoredResult], methods: Sequence[Method]) -> dict[str, Any]:
    by_method: dict[str, list[ScoredResult]] = defaultdict(list)
    for row in results:
        by_method[row.method].append(row)
    tasks = sorted({r.task for r in results})
    info = {m.key: m for m in methods}
    rows = {}
    for key, items in by_method.items():
        per_task = {t: _mean([r.score for r in items if r.task == t]) for t in tasks}
        kls = [r.kl for r in items if r.kl is not None]
        method = info.get(key)
        rows[key] = {"method": method.name if method else key, "family": method.family if method else "full",
                     "budget": method.average_budget if method else None, "tasks": per_task,
                     "score": _mean([v for v in per_task.values() if v is not None]),
                     "kl": _mean(kls) if kls else None, "n": len(items),
                     "samples_keeping_all": sum(1 for r in items if r.kept_all_layers)}
    full = rows.get("full", {}).get("score")
    budgets = sorted({m.average_budget for m in methods if m.average_budget is not None})
    recovery = []
    for budget in budgets:
        uniform = {k: v for k, v in rows.items() if v["family"] == "uniform" and v["budget"] == budget}
        if not uniform:
            continue
        best_key = max(uniform, key=lambda k: uniform[k]["score"])
        best = uniform[best_key]["score"]
        for key, row in rows.items():
            if row["budget"] != budget or row["family"] not in ("plan", "allocator"):
                continue
            gap = (full - best) if full is not None else None
            r = (row["score"] - best) / gap if gap and gap > 1e-12 else None
            interval = _bootstrap_r(by_method, key, best_key) if r is not None else None
            recovery.append({"budget": budget, "method": row["method"], "family": row["family"],
                             "score": row["score"], "best_uniform": uniform[best_key]["method"],
                             "best_uniform_score": best, "full_score": full, "R": r, "R_90": interval,
                             "kl": row["kl"], "best_uniform_kl": uniform[best_key]["kl"]})
    return {"tasks": tasks, "methods": rows, "recovery": recovery, "budgets": budgets,
            "samples": len({r.sample_id for r in results})}


def _bootstrap_r(by_method: dict[str, list[ScoredResult]], key: str, best_key: str, *, rounds: int = 2000,
                 seed: int = 0) -> list[float] | None:
    """5th and 95th percentiles of R over `rounds` redraws of the samples within each task (paired: one redraw
    serves the method, the best uniform policy and the full cache)."""
    scores: dict[str, dict[str, float]] = {}
    for name in (key, best_key, "full"):
        scores[name] = {r.sample_id: r.score for r in by_method.get(name, [])}
    tasks: dict[str, list[str]] = defaultdict(list)
    for row in by_method.get("full", []):
        if all(row.sample_id in scores[name] for name in (key, best_key)):
            tasks[row.task].append(row.sample_id)
    if not tasks:
        return None
    rng = random.Random(seed)
    values = []
    for _ in range(rounds):
        means = {name: 0.0 for name in scores}
        for ids in tasks.values():
            drawn = [rng.choice(ids) for _ in ids]
            for name in scores:
                means[name] += sum(scores[name][i] for i in drawn) / len(drawn) / len(tasks)
        gap = means["full"] - means[best_key]
        if gap > 1e-12:
            values.append((means[key] - means[best_key]) / gap)
    if len(values) < rounds // 2:
        return None
    values.sort()
    return [values[int(0.05 * (len(values) - 1))], values[int(0.95 * (len(values) - 1))]]


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown(summary: dict[str, Any]) -> str:
    tasks = summary["tasks"]
    lines = [f"Samples: {summary['samples']}. Score = mean over tasks of the per-task mean; KL = mean KL(full || "
             "method) over reference-answer tokens.", "",
             "| method | budget | " + " | ".join(tasks) + " | score | KL |",
             "|---|---|" + "---|" * len(tasks) + "---|---|"]
    order = sorted(summary["methods"].items(), key=lambda kv: (kv[1]["budget"] or 0, kv[1]["family"], kv[0]))
    for key, row in order:
        cells = [_fmt(row["tasks"].get(t)) for t in tasks]
        lines.append(f"| {row['method']} | {row['budget'] or 'full'} | " + " | ".join(cells)
                     + f" | **{_fmt(row['score'])}** | {_fmt(row['kl'], 4)} |")
    if summary["recovery"]:
        lines += ["", "Gap recovery R = (S - S_best_uniform) / (S_full - S_best_uniform):", "",
                  "| budget | method | score | best uniform | its score | full | R | R 90% bootstrap |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in summary["recovery"]:
            low_high = r.get("R_90")
            interval = f"[{low_high[0]:+.2f}, {low_high[1]:+.2f}]" if low_high else "-"
            lines.append(f"| {r['budget']} | {r['method']} | {_fmt(r['score'])} | {r['best_uniform']} | "
                         f"{_fmt(r['best_uniform_score'])} | {_fmt(r['full_score'])} | {_fmt(r['R'], 2)} | "
                         f"{interval} |")
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: str | Path, *, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for row in summary["methods"].values():
        if row["budget"] is not None and row["score"] is not None:
            series[(row["family"], row["method"])].append((row["budget"], row["score"]))
    for (family, name), points in sorted(series.items()):
        points.sort()
        style = {"plan": dict(lw=2.6, marker="o"), "allocator": dict(lw=1.6, marker="s", ls="--")}.get(
            family, dict(lw=1.0, marker=".", alpha=0.7))
        ax.plot([p[0] for p in points], [p[1] for p in points], label=name, **style)
    full = summary["methods"].get("full", {}).get("score")
    if full is not None:
        ax.axhline(full, color="black", ls=":", label="full cache")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("average budget (context tokens per layer)")
    ax.set_ylabel("score (mean over tasks)")
    ax.set_title(title)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = Path(path)
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def write_report(summary: dict[str, Any], results: Sequence[ScoredResult], out_dir: str | Path, *,
                 title: str) -> dict[str, Path]:
    out_dir = Path(out_dir)
    paths = {"json": write_json_atomic(out_dir / "report.json", {**summary, "results": [asdict(r) for r in results]}),
             "markdown": write_atomic(out_dir / "report.md", f"# {title}\n\n" + markdown(summary)),
             "png": plot(summary, out_dir / "scores.png", title=title)}
    return paths
