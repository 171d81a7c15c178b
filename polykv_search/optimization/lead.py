"""How sure the guard is of a rung it kept: the lead of its task loss over the best uniform policy's on the
calibration samples, with a 90% interval from a paired bootstrap (the samples redrawn within each task, one redraw
serving both candidates, as `evaluate`'s interval of R). A lead whose interval reaches below 0 was kept on a margin
the samples cannot tell from chance."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

ROUNDS = 2000


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

    def describe(self) -> str:
        return (f"lead over {self.over} {self.value:+.3f} [90%: {self.low:+.3f}, {self.high:+.3f}], paired bootstrap "
                f"within tasks over {self.samples} samples")


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

    rng = random.Random(seed)
    values = sorted(mean([[rng.choice(g) for _ in g] for g in groups]) for _ in range(rounds))
    return Lead(over=over, value=mean(groups), low=values[int(0.05 * (rounds - 1))],
                high=values[int(0.95 * (rounds - 1))], samples=sum(len(g) for g in groups))
