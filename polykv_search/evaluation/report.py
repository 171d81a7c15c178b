"""The evaluation report: per task and overall scores and KL per method, gap recovery R per budget, as JSON,
a Markdown table and a PNG of score against budget.

R = (S_plan - S_best_uniform) / (S_full - S_best_uniform), all on the same samples; S is the mean over tasks
of the per-task mean score (LongBench's convention), S_best_uniform the best single policy at that budget. A plan
made for an engine (trtllm, duo-attention) also gets R_engine, the same with the engine's own setting in place of
the best uniform policy.
Each R comes with a 90% paired bootstrap interval: the samples are redrawn with replacement within each task
(the best uniform policy stays the one chosen on all samples), so a difference inside it is noise.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from polykv_search.evaluation.methods import Method
from polykv_search.evaluation.run import ScoredResult
from polykv_search.io import write_atomic, write_json_atomic
from polykv_search.optimization.lead import interval_90, stratified_redraws


@dataclass(frozen=True)
class MethodScore:
    """One method over every sample: the score per task and overall (mean over tasks), and the mean KL."""

    method: str
    family: str
    budget: float | None
    tasks: dict[str, float | None]
    score: float | None
    kl: float | None
    n: int
    samples_keeping_all: int  # samples where a budget kept some compressed layer's whole context
    kv_entries: float | None = None  # mean over samples of the context entries kept, over compressible layers x heads
    kv_mb: float | None = None  # mean over samples of the megabytes the whole cache allocates (runtime layout)


@dataclass(frozen=True)
class Recovery:
    """Gap recovery of one plan or allocator at one budget, with its 90% paired bootstrap interval."""

    budget: float
    method: str
    family: str
    score: float
    best_uniform: str
    best_uniform_score: float
    full_score: float | None
    R: float | None  # noqa: N815 (the paper's symbol)
    R_90: list[float] | None  # noqa: N815
    kl: float | None
    best_uniform_kl: float | None
    # a plan made for an engine (run --target, evaluate --target): R against that engine's own setting at the budget
    target: str | None = None  # trtllm or duo-attention
    engine_setting: str | None = None  # the uniform policy standing for the engine's own setting (streaming)
    engine_score: float | None = None
    R_engine: float | None = None  # noqa: N815
    R_engine_90: list[float] | None = None  # noqa: N815


# Context-length buckets R is reported in when the samples span several (and no plan brings its own ranges).
LENGTH_EDGES = (2048, 4096, 8192, 16384, 32768)


@dataclass(frozen=True)
class LengthBucket:
    """Gap recovery on the samples whose context length is in [min_tokens, max_tokens] (None: no upper end)."""

    min_tokens: int
    max_tokens: int | None
    samples: int
    recovery: list[Recovery]

    @property
    def label(self) -> str:
        return f"{self.min_tokens}+" if self.max_tokens is None else f"{self.min_tokens}-{self.max_tokens}"


@dataclass
class Report:
    """What `evaluate` measured: per method and task, the gap recovery per budget (overall and per context-length
    bucket, where the samples span several), and every scored answer."""

    tasks: list[str]
    methods: dict[str, MethodScore]  # by Method.key
    recovery: list[Recovery]
    budgets: list[float]
    samples: int
    results: list[ScoredResult] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)  # where `save` wrote it: json, markdown, png
    by_length: list[LengthBucket] = field(default_factory=list)
    question_aware: bool = False  # the setting every method was answered in: the question compressed with the context

    def recovery_of(self, method: str) -> list[Recovery]:
        """The rows of one method (a plan file's stem, "pyramidkv", "cake"), budget increasing."""
        return sorted((r for r in self.recovery if r.method == method), key=lambda r: r.budget)

    @property
    def full_score(self) -> float | None:
        full = self.methods.get("full")
        return None if full is None else full.score

    def to_dict(self) -> dict[str, Any]:
        return {"tasks": list(self.tasks), "methods": {k: asdict(v) for k, v in self.methods.items()},
                "recovery": [asdict(r) for r in self.recovery], "budgets": list(self.budgets),
                "samples": self.samples, "results": [asdict(r) for r in self.results],
                "by_length": [asdict(b) for b in self.by_length], "question_aware": self.question_aware}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        return cls(tasks=list(data["tasks"]), methods={k: MethodScore(**v) for k, v in data["methods"].items()},
                   recovery=[Recovery(**r) for r in data["recovery"]], budgets=list(data["budgets"]),
                   samples=int(data["samples"]), results=[ScoredResult(**r) for r in data.get("results", [])],
                   by_length=[LengthBucket(**{**b, "recovery": [Recovery(**r) for r in b["recovery"]]})
                              for b in data.get("by_length", [])],
                   question_aware=bool(data.get("question_aware", False)))

    def markdown(self) -> str:
        return markdown(self)

    def save(self, out_dir: str | Path, *, title: str) -> dict[str, Path]:
        """report.json, report.md and scores.png under `out_dir`, each written atomically."""
        out_dir = Path(out_dir)
        self.files = {"json": write_json_atomic(out_dir / "report.json", self.to_dict()),
                      "markdown": write_atomic(out_dir / "report.md", f"# {title}\n\n" + markdown(self)),
                      "png": plot(self, out_dir / "scores.png", title=title)}
        return self.files


def summarize(results: Sequence[ScoredResult], methods: Sequence[Method], *, kv_slots: int | None = None,
              length_edges: Sequence[int] | None = None) -> Report:
    """Scores per method and task, and R per budget for every plan and allocator, from scored answers. `kv_slots`
    (compressible layers x KV heads) turns each method's KV entries into tokens kept per layer and head. Where the
    samples' context lengths fall in several buckets, R per bucket too: the buckets are split at `length_edges`
    (default: the plans' own ranges of prompt lengths, else LENGTH_EDGES)."""
    report = _summary(results, methods, kv_slots=kv_slots)
    edges = sorted(set(length_edges if length_edges is not None else _plan_edges(methods) or LENGTH_EDGES))
    spans = list(zip([0] + [e + 1 for e in edges], [*edges, None]))
    groups = [(low, high, [r for r in results if r.context_tokens >= low and (high is None or
                                                                          r.context_tokens <= high)])
              for low, high in spans]
    groups = [g for g in groups if g[2]]
    if len(groups) > 1:
        report.by_length = [LengthBucket(min_tokens=low, max_tokens=high, samples=len({r.sample_id for r in rows}),
                                         recovery=_summary(rows, methods, kv_slots=kv_slots).recovery)
                            for low, high, rows in groups]
    return report


def _plan_edges(methods: Sequence[Method]) -> list[int]:
    """The upper ends of the plans' ranges of prompt lengths (schema 2.1 rungs), where a plan has several."""
    return [rung.context.max_tokens for m in methods for rung in m.rungs
            if rung.context is not None and rung.context.max_tokens is not None]


def _summary(results: Sequence[ScoredResult], methods: Sequence[Method], *, kv_slots: int | None) -> Report:
    by_method: dict[str, list[ScoredResult]] = defaultdict(list)
    for row in results:
        by_method[row.method].append(row)
    tasks = sorted({r.task for r in results})
    info = {m.key: m for m in methods}
    rows: dict[str, MethodScore] = {}
    for key, items in by_method.items():
        per_task = {t: _mean([r.score for r in items if r.task == t]) for t in tasks}
        kls = [r.kl for r in items if r.kl is not None]
        method = info.get(key)
        rows[key] = MethodScore(method=method.name if method else key, family=method.family if method else "full",
                                budget=method.average_budget if method else None, tasks=per_task,
                                score=_mean([v for v in per_task.values() if v is not None]),
                                kl=_mean(kls) if kls else None, n=len(items),
                                samples_keeping_all=sum(1 for r in items if r.kept_all_layers),
                                kv_entries=_mean([r.kv_entries / kv_slots for r in items
                                                  if r.kv_entries is not None and kv_slots]),
                                kv_mb=_mean([r.kv_bytes / 1e6 for r in items if r.kv_bytes is not None]))
    full = rows["full"].score if "full" in rows else None
    budgets = sorted({m.average_budget for m in methods if m.average_budget is not None})
    recovery = []
    for budget in budgets:
        uniform = {k: v for k, v in rows.items() if v.family == "uniform" and v.budget == budget}
        engines = {k: v for k, v in rows.items() if v.family == "engine" and v.budget == budget}
        if not uniform:
            continue
        best_key = max(uniform, key=lambda k: uniform[k].score)
        best = uniform[best_key].score
        for key, row in rows.items():
            if row.budget != budget or row.family not in ("plan", "allocator"):
                continue
            gap = (full - best) if full is not None else None
            r = (row.score - best) / gap if gap and gap > 1e-12 else None
            interval = _bootstrap_r(by_method, key, best_key) if r is not None else None
            recovery.append(Recovery(budget=budget, method=row.method, family=row.family, score=row.score,
                                     best_uniform=uniform[best_key].method, best_uniform_score=best, full_score=full,
                                     R=r, R_90=interval, kl=row.kl, best_uniform_kl=uniform[best_key].kl,
                                     **_against_engine(info.get(key), key, row.score, {**uniform, **engines},
                                                       full, by_method)))
    return Report(tasks=tasks, methods=rows, recovery=recovery, budgets=budgets,
                  samples=len({r.sample_id for r in results}), results=list(results))


def _against_engine(method: Method | None, key: str, score: float, uniform: dict[str, MethodScore],
                    full: float | None, by_method: dict[str, list[ScoredResult]]) -> dict[str, Any]:
    """For a plan made for an engine: the engine's own setting at its budget (the best scored of `method.engine`,
    among `uniform`: the uniform policies and the engines' own settings), its score, and R against it, with its
    interval; nothing for any other method."""
    scored = [k for k in uniform if method is not None and uniform[k].method in method.engine]
    if method is None or not method.target or not scored:
        return {}
    engine_key = max(scored, key=lambda k: uniform[k].score)
    engine = uniform[engine_key].score
    gap = (full - engine) if full is not None else None
    r = (score - engine) / gap if gap and gap > 1e-12 else None
    return {"target": method.target, "engine_setting": uniform[engine_key].method, "engine_score": engine,
            "R_engine": r, "R_engine_90": _bootstrap_r(by_method, key, engine_key) if r is not None else None}


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
    values = []
    for draw in stratified_redraws(list(tasks.values()), rounds, seed):
        means = {name: 0.0 for name in scores}
        for drawn in draw:
            for name in scores:
                means[name] += sum(scores[name][i] for i in drawn) / len(drawn) / len(tasks)
        gap = means["full"] - means[best_key]
        if gap > 1e-12:
            values.append((means[key] - means[best_key]) / gap)
    if len(values) < rounds // 2:
        return None
    return list(interval_90(values))


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def markdown(report: Report) -> str:
    tasks = report.tasks
    lines = [f"Samples: {report.samples}. Score = mean over tasks of the per-task mean; KL = mean KL(full || "
             "method) over reference-answer tokens; KV = context tokens kept per compressible layer and KV head (the "
             "entries, counted as they are stored); MB = the whole cache as the runtime allocates it (per-head plans "
             "in a ragged cache, one length per head)." + (
                 " Question-aware: every method compressed the question with the context (kvpress's "
                 "compress_questions)." if report.question_aware else ""), "",
             "| method | budget | " + " | ".join(tasks) + " | score | KL | KV | MB |",
             "|---|---|" + "---|" * len(tasks) + "---|---|---|---|"]
    order = sorted(report.methods.items(), key=lambda kv: (kv[1].budget or 0, kv[1].family, kv[0]))
    for _, row in order:
        cells = [_fmt(row.tasks.get(t)) for t in tasks]
        lines.append(f"| {row.method} | {row.budget or 'full'} | " + " | ".join(cells)
                     + f" | **{_fmt(row.score)}** | {_fmt(row.kl, 4)} | {_fmt(row.kv_entries, 0)} | "
                     f"{_fmt(row.kv_mb, 1)} |")
    if report.recovery:
        lines += ["", "Gap recovery R = (S - S_best_uniform) / (S_full - S_best_uniform):", "",
                  "| budget | method | score | best uniform | its score | full | R | R 90% bootstrap |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in report.recovery:
            interval = f"[{r.R_90[0]:+.2f}, {r.R_90[1]:+.2f}]" if r.R_90 else "-"
            lines.append(f"| {r.budget} | {r.method} | {_fmt(r.score)} | {r.best_uniform} | "
                         f"{_fmt(r.best_uniform_score)} | {_fmt(r.full_score)} | {_fmt(r.R, 2)} | {interval} |")
    engine_rows = [r for r in report.recovery if r.target]
    if engine_rows:
        lines += ["", "Plans made for an engine: R_engine = (S - S_engine) / (S_full - S_engine), S_engine the "
                  "engine's own setting at the same budget (what it runs without a plan), beside R against the best "
                  "uniform policy:", "",
                  "| budget | method | target | score | engine setting | its score | full | R_engine | R_engine 90% "
                  "| R (best uniform) |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in engine_rows:
            interval = f"[{r.R_engine_90[0]:+.2f}, {r.R_engine_90[1]:+.2f}]" if r.R_engine_90 else "-"
            lines.append(f"| {r.budget} | {r.method} | {r.target} | {_fmt(r.score)} | {r.engine_setting} | "
                         f"{_fmt(r.engine_score)} | {_fmt(r.full_score)} | {_fmt(r.R_engine, 2)} | {interval} | "
                         f"{_fmt(r.R, 2)} |")
    if report.by_length:
        lines += ["", "R per context length (tokens compressed at prefill; each bucket its own full cache and best "
                  "uniform policy):", "",
                  "| context tokens | samples | budget | method | score | best uniform | its score | full | R "
                  "| R 90% |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for bucket in report.by_length:
            for r in bucket.recovery:
                interval = f"[{r.R_90[0]:+.2f}, {r.R_90[1]:+.2f}]" if r.R_90 else "-"
                lines.append(f"| {bucket.label} | {bucket.samples} | {r.budget} | {r.method} | {_fmt(r.score)} | "
                             f"{r.best_uniform} | {_fmt(r.best_uniform_score)} | {_fmt(r.full_score)} | "
                             f"{_fmt(r.R, 2)} | {interval} |")
    return "\n".join(lines) + "\n"


def plot(report: Report, path: str | Path, *, title: str) -> Path:
    """Score against budget for every method, the full cache as a line."""
    import matplotlib  # imported here: matplotlib takes a second to load and only the report draws

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    series: dict[tuple[str, str], list[tuple[float, float]]] = defaultdict(list)
    for row in report.methods.values():
        if row.budget is not None and row.score is not None:
            series[(row.family, row.method)].append((row.budget, row.score))
    for (family, name), points in sorted(series.items()):
        points.sort()
        style = {"plan": dict(lw=2.6, marker="o"), "allocator": dict(lw=1.6, marker="s", ls="--")}.get(
            family, dict(lw=1.0, marker=".", alpha=0.7))
        ax.plot([p[0] for p in points], [p[1] for p in points], label=name, **style)
    if report.full_score is not None:
        ax.axhline(report.full_score, color="black", ls=":", label="full cache")
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
