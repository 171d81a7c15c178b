"""One evaluation or calibration example in canonical (LongBench) form."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    """A LongBench-style row: `context` is compressed, `question` is asked after it, `answers` are references."""

    id: str
    task: str
    context: str
    question: str
    answers: tuple[str, ...]
    all_classes: tuple[str, ...] | None = None
    length: int = 0  # words in the context, as LongBench's `length` column

    def to_row(self) -> dict[str, object]:
        """The LongBench JSON row for this sample (keys `_id`, `dataset`, `input`, ...)."""
        return {
            "context": self.context,
            "input": self.question,
            "answers": list(self.answers),
            "length": self.length,
            "dataset": self.task,
            "all_classes": list(self.all_classes) if self.all_classes is not None else None,
            "_id": self.id,
        }


def spread_over_tasks(samples: list[Sample], n: int | None) -> list[Sample]:
    """At most n samples taken in turn from each task (file order kept within a task), so that a subset of a
    file grouped by task still covers every task; n=None keeps all."""
    if n is None or n >= len(samples):
        return list(samples)
    by_task: dict[str, list[Sample]] = {}
    for sample in samples:
        by_task.setdefault(sample.task, []).append(sample)
    chosen: list[Sample] = []
    depth = 0
    while len(chosen) < n:
        for rows in by_task.values():
            if depth < len(rows) and len(chosen) < n:
                chosen.append(rows[depth])
        depth += 1
    keep = {id(s) for s in chosen}
    return [s for s in samples if id(s) in keep]
