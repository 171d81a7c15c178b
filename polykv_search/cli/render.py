"""What the commands show a person: progress bars (the API's progress callback), tables of plans, profiles and
results. Everything here draws on stderr through rich; results for machines go to stdout as JSON."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from polykv_search.cli.errors import err_console, release_held
from polykv_search.plan import PlanFile

if TYPE_CHECKING:  # the library loads torch (seconds); these modules only need its types
    from polykv_search.calibration import Profile
    from polykv_search.evaluation import Report
    from polykv_search.optimization.choose import Choice

ProgressFn = Callable[[str, int, int, str], None]  # polykv_search.api.Progress

TABLE_SIGNALS = {"entropy": "H", "variance": "V", "sparsity": "sparse", "shift": "shift", "sink_mass": "sink",
                 "recent_mass": "recent"}


@contextmanager
def progress_bars(*, plain: bool | None = None, interval: float = 30.0) -> Iterator[ProgressFn]:
    """A progress callback for the API: one bar per stage with its count, elapsed time and estimate; a stage
    that reports no total (a step of the optimizer) shows as a line of text. When stderr is not a terminal (a batch
    job, nohup, CI; `plain` forces either way), plain lines instead (`PlainProgress`), at least every `interval` s."""
    if plain if plain is not None else not err_console.is_terminal:
        def write(line: str) -> None:
            release_held()  # the device line, before the first progress line
            err_console.print(line, markup=False, highlight=False)

        lines = PlainProgress(write=write, interval=interval)
        stop = threading.Event()

        def heartbeat() -> None:  # a line at least every `interval` s, even while one step takes minutes
            while not stop.wait(1.0):
                lines.tick()

        beat = threading.Thread(target=heartbeat, name="polykv-progress", daemon=True)
        beat.start()
        try:
            yield lines.update
        finally:
            stop.set()
            beat.join()
        return
    columns = (TextColumn("[bold]{task.fields[stage]}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.description}"))
    # started at the first bar: a command refused before any work leaves no empty line where its bars would be
    bars = Progress(*columns, console=err_console, transient=False)
    tasks: dict[str, int] = {}

    def update(stage: str, done: int, total: int, note: str = "") -> None:
        release_held()  # the device line, before the first bar
        if total <= 0:
            err_console.print(f"{stage}: {escape(note)}", highlight=False)
            return
        if not tasks:
            bars.start()
        if stage not in tasks:
            tasks[stage] = bars.add_task(escape(note), total=total, stage=stage)
        bars.update(tasks[stage], completed=done, total=total, description=escape(note))

    try:
        yield update
    finally:
        if tasks:
            bars.stop()


@dataclass
class PlainProgress:
    """Progress as plain lines for a log: "stage i/N, elapsed, eta: note", written when a stage starts or ends and
    otherwise at most every `interval` seconds of updates; `tick` (called by a heartbeat) writes the last state
    again once `interval` has passed without a line, so a log shows a line at least that often during a long step.
    `clock` is injectable (tests)."""

    write: Callable[[str], None]
    interval: float = 30.0
    clock: Callable[[], float] = time.monotonic
    _state: tuple[str, int, int, str] | None = None
    _started: dict[str, float] = field(default_factory=dict)
    _last: float = -math.inf
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def update(self, stage: str, done: int, total: int, note: str = "") -> None:
        with self._lock:
            now = self.clock()
            if total <= 0:  # a step with no count: a line of its own
                self.write(f"{stage}: {note}")
                self._last = now
                return
            new_stage = stage not in self._started
            self._started.setdefault(stage, now)
            self._state = (stage, done, total, note)
            if new_stage or done >= total or now - self._last >= self.interval:
                self._emit(now)

    def tick(self) -> None:
        with self._lock:
            now = self.clock()
            if self._state is not None and now - self._last >= self.interval:
                self._emit(now)

    def _emit(self, now: float) -> None:
        stage, done, total, note = self._state
        elapsed = now - self._started[stage]
        eta = _duration(elapsed * (total - done) / done) if 0 < done < total else "?" if done < total else "0s"
        self.write(f"{stage} {done}/{total}, elapsed {_duration(elapsed)}, eta {eta}" + (f": {note}" if note else ""))
        self._last = now


def _duration(seconds: float) -> str:
    """1h02m, 3m05s, 42s."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def plan_table(plan_file: PlanFile, *, title: str = "") -> Table:
    """Layer, type, then policy and budget per ladder rung; the last rows: the solver and the sum."""
    table = Table(title=title or f"{plan_file.model.id}: policy and tokens per layer",
                  caption="made for the question-aware setting (the question compressed with the context)"
                  if plan_file.question_aware else None)
    table.add_column("layer", justify="right")
    table.add_column("type")
    for plan in plan_file.plans:
        lengths = f"\n{plan.context.min_tokens}" + ("+" if plan.context.max_tokens is None else
                                                    f"-{plan.context.max_tokens}") + " tok" \
            if plan_file.by_length and plan.context is not None else ""
        table.add_column(f"B={plan.average_budget:g}{lengths}", justify="right")
    for i, kind in enumerate(plan_file.model.layer_types):
        cells = []
        for plan in plan_file.plans:
            layer = plan.layers[i]
            if layer.sliding_window:
                cells.append("fixed")
            elif layer.heads is not None:  # per KV head: "policy budget" of each head, separated by "|"
                cells.append(" | ".join(f"{head.policy} {head.budget}" for head in layer.heads))
            else:
                cells.append(f"{layer.policy} {layer.budget}")
        table.add_row(str(i), "sliding" if kind == "sliding_attention" else "full", *cells)
    footer = []
    for plan in plan_file.plans:
        s = plan.search
        objective = f", obj {s.objective:.4g}" if s.objective is not None else ""
        gap = f" gap {s.gap:.2g}" if s.gap is not None else ""
        footer.append(f"{s.solver} {s.status}{objective}{gap}")
    table.add_row("", "", *footer)
    table.add_row("sum", "", *[str(plan.constraint.total_realised) for plan in plan_file.plans], style="bold")
    return table


def profile_table(profile: Profile) -> Table:
    """Per layer: the signals, and the policies losing least and most decoding attention at a reference budget."""
    info = profile.model
    budget = _reference_budget(profile)
    g = profile.budgets.index(budget)
    costs = profile.layer_costs("mass_lost")[:, :, g]  # (L, P)
    signals = profile.layer_signals()
    table = Table(title=f"{info.model_id}: per-layer signals, {profile.num_samples} samples",
                  caption=f"H entropy (nats), V window variance (CAKE), sparse = share of tokens holding 90% of "
                          f"decoding attention, shift = prefill-to-decoding total variation; best/worst policy = "
                          f"least/most decoding attention mass lost at {budget} tokens", show_lines=False)
    table.add_column("layer", justify="right")
    table.add_column("type")
    for short in TABLE_SIGNALS.values():
        table.add_column(short, justify="right")
    table.add_column(f"best@{budget}")
    table.add_column("lost", justify="right")
    table.add_column("worst")
    for layer in range(info.num_layers):
        kind = "slide" if info.layer_types[layer] == "sliding_attention" else "full"
        row = [str(layer), kind]
        row += [_fmt(signals[name][layer].item()) for name in TABLE_SIGNALS]
        if all(math.isnan(v) for v in costs[layer].tolist()):
            row += ["(fixed)", "", ""]
        else:
            best, worst = int(costs[layer].argmin()), int(costs[layer].argmax())
            row += [profile.policies[best], f"{costs[layer, best].item():.3f}", profile.policies[worst]]
        table.add_row(*row)
    return table


def choice_table(candidates: list[str], choices: list[Choice], *, what: str, samples: int) -> Table:
    """One row per candidate, one column per budget; the chosen rung in bold."""
    table = Table(title=f"mean {what} on {samples} calibration samples (lower is better; chosen in bold)")
    table.add_column("candidate", no_wrap=True)
    for choice in choices:
        table.add_column(f"{choice.budget:g}", justify="right")
    for name in candidates:
        table.add_row(escape(name), *(("[bold]" if c.chosen == name else "") + f"{c.measured[name]:.4f}"
                                      if name in c.measured else "-" for c in choices))
    return table


def recovery_lines(report: Report, method: str) -> list[str]:
    """'R at B tokens/layer: ...' for each budget of one method, with the scores behind it and the interval."""
    lines = []
    for r in report.recovery_of(method):
        interval = f", 90% bootstrap [{r.R_90[0]:+.2f}, {r.R_90[1]:+.2f}]" if r.R_90 else ""
        lines.append(f"R at {r.budget:g} tokens/layer: {r.R if r.R is None else round(r.R, 3)} "
                     f"({method} {r.score:.3f}, best uniform {r.best_uniform} {r.best_uniform_score:.3f}, "
                     f"full {r.full_score:.3f}{interval})")
        if r.target:
            interval = f", 90% bootstrap [{r.R_engine_90[0]:+.2f}, {r.R_engine_90[1]:+.2f}]" if r.R_engine_90 else ""
            lines.append(f"R against {r.target}'s own setting at {r.budget:g} tokens/layer: "
                         f"{r.R_engine if r.R_engine is None else round(r.R_engine, 3)} ({r.engine_setting} "
                         f"{r.engine_score:.3f}{interval})")
    return lines


def _reference_budget(profile: Profile) -> int:
    """The grid budget nearest to 10% of the median context: where policies differ most visibly."""
    ctx = profile.arrays["context_tokens"].float().median().item()
    target = max(16.0, 0.1 * ctx)
    return min(profile.budgets, key=lambda b: abs(math.log(b) - math.log(target)))


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2f}"
