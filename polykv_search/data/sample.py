"""One evaluation or calibration example: a LongBench row, or a kvpress row whose context and question carry their
own instructions."""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass


@dataclass(frozen=True)
class Sample:
    """A row: `context` is compressed, `question` is asked after it, `answers` are references.

    `templated` rows (kvpress's form: `question`, `answer_prefix`, `max_new_tokens`, `task`) carry their own
    instructions and are joined as given; other rows get their task's LongBench-style template. A row's own
    `answer_prefix` and `max_new_tokens`, when set, replace the template's.
    """

    id: str
    task: str
    context: str
    question: str
    answers: tuple[str, ...]
    all_classes: tuple[str, ...] | None = None
    length: int = 0  # words in the context, as LongBench's `length` column
    answer_prefix: str | None = None  # the start of the reply, written for the model (kvpress)
    max_new_tokens: int | None = None  # the answer's room in tokens
    templated: bool = False  # context and question already hold the instructions (kvpress's form)

    def to_row(self) -> dict[str, object]:
        """The JSON row for this sample: LongBench keys (`_id`, `dataset`, `input`, ...), or kvpress's
        (`question`, `task`, `answer_prefix`, ...) for a templated sample."""
        if self.templated:
            row: dict[str, object] = {"context": self.context, "question": self.question,
                                      "answers": list(self.answers), "task": self.task, "_id": self.id}
        else:
            row = {"context": self.context, "input": self.question, "answers": list(self.answers),
                   "length": self.length, "dataset": self.task,
                   "all_classes": list(self.all_classes) if self.all_classes is not None else None, "_id": self.id}
        if self.answer_prefix is not None:
            row["answer_prefix"] = self.answer_prefix
        if self.max_new_tokens is not None:
            row["max_new_tokens"] = self.max_new_tokens
        return row


def task_key(task: str, table: Container[str]) -> str | None:
    """The entry of `task` in a per-task table (metrics, templates): the task itself, else the base task of a
    LongBench-E name ("hotpotqa_e" -> "hotpotqa"); None when the table has neither."""
    if task in table:
        return task
    if task.endswith("_e") and task[:-2] in table:
        return task[:-2]
    return None


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
