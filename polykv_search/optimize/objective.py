"""The end-to-end objective: mean KL(full cache || plan) over the reference answers of calibration samples,
measured with the shared-prefill engine (each sample is prefilled once, then every candidate plan costs one
short teacher-forced forward per sample)."""

from __future__ import annotations

from collections.abc import Sequence

from polykv_search.data import Sample
from polykv_search.evaluate.engine import EvaluationEngine, Method
from polykv_search.models import LoadedModel


class EndToEndObjective:
    """Call with per-layer policies and budgets (None on sliding layers); lower is better."""

    def __init__(self, lm: LoadedModel, samples: Sequence[Sample], *, policies: Sequence[str],
                 max_context_tokens: int | None = None, batch_size: int = 16) -> None:
        self.engine = EvaluationEngine(lm, policies=policies, max_context_tokens=max_context_tokens)
        self.states = [self.engine.prefill(sample) for sample in samples]  # one prefill per sample, kept
        self.states = [s for s in self.states if s.full_logprobs is not None]
        self.batch_size = batch_size
        self.evaluations = 0

    def many(self, candidates: Sequence[tuple[Sequence[str | None], Sequence[int | None]]]) -> list[float]:
        """Mean KL of each candidate (policies, budgets), batched across candidates for each sample."""
        methods = [Method(f"c{i}", "plan", None, tuple(p), tuple(b)) for i, (p, b) in enumerate(candidates)]
        totals = [0.0] * len(methods)
        for state in self.states:
            for i, kl in enumerate(self.engine.kl_many(state, methods, batch_size=self.batch_size)):
                totals[i] += kl
        self.evaluations += len(methods)
        return [t / max(len(self.states), 1) for t in totals]

    def __call__(self, policies: Sequence[str | None], budgets: Sequence[int | None]) -> float:
        return self.many([(policies, budgets)])[0]
