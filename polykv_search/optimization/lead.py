"""How sure the guard is: one candidate's task-loss lead over another's on the calibration samples (a kept rung over
the uniform policy it beat, one candidate set's plan over another's, a trtllm candidate over the engine's window),
with a 90% interval from a paired bootstrap: the samples redrawn within each task, one redraw serving both candidates.
`evaluate`'s interval of R draws the same way (`stratified_redraws`). A lead whose interval reaches 0 or below is a
margin the samples cannot tell from chance."""

from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

ROUNDS = 2000
T = TypeVar("T")


@dataclass(frozen=True)
class Lead:
    """`value`: the uniform candidate `over`'s mean loss minus the kept rung's (> 0: the kept rung measured lower),
    the mean over tasks of each task's mean, as the guard's figures; `low`, `high`: its 5th and 95th percentiles over
    redraws of the `samples` both were measured on."""

    over: str
    value: float
    low: float
    high: float
    samples: int
    tasks: int = 0
    alone: int = 0  # tasks of one sample: redrawn, they never vary, so the interval cannot see their spread

    def describe(self) -> str:
        thin = (f"; {self.alone} of its {self.tasks} tasks with one sample, whose spread the interval cannot see"
                if self.alone else "")
        return (f"lead over {self.over} {self.value:+.3f} [90%: {self.low:+.3f}, {self.high:+.3f}], paired bootstrap "
                f"within tasks over {self.samples} samples{thin}")


def paired_lead(kept: Mapping[str, float], other: Mapping[str, float], tasks: Mapping[str, str], *, over: str,
                rounds: int = ROUNDS, seed: int = 0) -> Lead | None:
    """The lead of `kept` over `other` (sample id -> loss, lower is better; `tasks`: sample id -> task) on the
    samples all three name; None when there is none."""
    by_task: dict[str, list[float]] = {}
    for sid, loss in kept.items():
        if sid in other and sid in tasks:
            by_task.setdefault(tasks[sid], []).append(other[sid] - loss)
    if not by_task:
        return None
    groups = list(by_task.values())

    def mean(draws: list[list[float]]) -> float:
        return sum(sum(g) / len(g) for g in draws) / len(draws)

    values = [mean(draw) for draw in stratified_redraws(groups, rounds, seed)]
    low, high = interval_90(values)
    return Lead(over=over, value=mean(groups), low=low, high=high, samples=sum(len(g) for g in groups),
                tasks=len(groups), alone=sum(len(g) == 1 for g in groups))


def stratified_redraws(groups: Sequence[Sequence[T]], rounds: int = ROUNDS, seed: int = 0) -> Iterator[list[list[T]]]:
    """`rounds` bootstrap redraws, each group (a task's samples) redrawn with replacement to its own size, the groups
    in order: a paired bootstrap when every compared method is read at the drawn samples."""
    rng = random.Random(seed)
    for _ in range(rounds):
        yield [[rng.choice(group) for _ in group] for group in groups]


def interval_90(values: Sequence[float]) -> tuple[float, float]:
    """The 5th and 95th percentiles of bootstrap `values` (nearest rank below)."""
    ordered = sorted(values)
    return ordered[int(0.05 * (len(ordered) - 1))], ordered[int(0.95 * (len(ordered) - 1))]
