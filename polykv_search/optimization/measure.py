"""Finished plans measured end to end on calibration samples, one budget's candidate rungs at a time: what `choose`
and the guard decide by."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from polykv_search.data import Sample
from polykv_search.engine import EndToEndObjective, Measures
from polykv_search.engine.progress import Progress
from polykv_search.errors import ConfigError
from polykv_search.models import LoadedModel
from polykv_search.plan import Plan, PlanFile
from polykv_search.plan.names import Metric


class RungMeasure:
    """The end-to-end objective over `samples` with every scorer the files' rungs use (each sample prefilled once
    when built); called with one budget's rungs (and optionally `plans_for(sample)`, each sample's own candidates
    in their place), it returns each rung's metrics. `progress` hears of each prefill, then of each budget. The
    samples are prompted in the setting the files were made for (all must agree: `PlanFile.question_aware`).
    `windowed`: the rungs are TensorRT-LLM windows, answered as that engine computes them (a prefill each)."""

    def __init__(self, lm: LoadedModel, samples: Sequence[Sample], files: Sequence[PlanFile], *, metric: Metric,
                 stage: str, budgets: int, progress: Progress | None = None,
                 max_context_tokens: int | None = None, windowed: bool = False) -> None:
        scorers = {name: scorer for f in files for rung in f.plans for name, scorer in rung.scorers.items()}
        settings = {f.question_aware for f in files}
        if len(settings) > 1:
            raise ConfigError("the plans to measure were made for different settings (query-agnostic and "
                              "question-aware); measure each setting's plans on their own")
        self.stage, self.steps, self.progress = stage, len(samples) + budgets, progress
        self._step(0, "prefilling the calibration samples")
        self.objective = EndToEndObjective(
            lm, samples, policies=list(scorers.values()), metric=metric, max_context_tokens=max_context_tokens,
            question_aware=settings == {True}, windowed=windowed,
            on_prefill=lambda done, _: self._step(done, "prefilling the calibration samples"))
        self.done = len(samples)

    @property
    def samples(self) -> int:
        """The samples measured (those whose prefill fits the model's context)."""
        return len(self.objective.states)

    def __call__(self, plans: list[Plan],
                 plans_for: Callable[[Sample], list[Plan]] | None = None) -> list[Measures]:
        values = self.objective.measure_each(plans_for or (lambda _: plans), len(plans))
        self.done += 1
        self._step(self.done, f"{plans[0].average_budget:g} tokens/layer measured")
        return values

    def each(self, plans: list[Plan],
             plans_for: Callable[[Sample], list[Plan]] | None = None) -> list[list[tuple[Sample, Measures]]]:
        """As calling it, but per candidate: each measured sample with its metrics on it, before any mean (a sample
        without a reference answer is not measured and not in it)."""
        rows = self.objective.sample_rows(plans_for or (lambda _: plans), len(plans))
        self.done += 1
        self._step(self.done, f"{plans[0].average_budget:g} tokens/layer measured")
        samples = [state.sample for state in self.objective.states]
        return [[(sample, row[i]) for sample, row in zip(samples, rows)] for i in range(len(plans))]

    def _step(self, done: int, note: str) -> None:
        if self.progress:
            self.progress(self.stage, done, self.steps, note)
