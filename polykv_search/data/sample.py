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
