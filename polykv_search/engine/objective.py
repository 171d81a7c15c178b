"""The end-to-end objective over the reference answers of calibration samples, measured with the shared-prefill
engine (each sample is prefilled once, then every candidate plan costs one short teacher-forced forward per
sample): "kl" = mean KL(full cache || plan), "nll" = the reference's negative log-likelihood, "miss" = the share
of reference tokens that are not the top-1 prediction, "lost" = 1 - exp(-KL) per sample, the share of the full
cache's output distribution lost (it saturates, so samples that every plan gets wrong do not decide the mean),
"task" = 1 - the task's own score (the evaluation metric) of the greedy answer against the sample's gold answers:
the only one that decodes, and the one `evaluate` reports, so the one to choose finished plans by."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TypedDict

from polykv_search.data import Sample
from polykv_search.data.metrics import score_sample
from polykv_search.engine.engine import PrefillEngine, PrefillState
from polykv_search.errors import ConfigError
from polykv_search.models import LoadedModel
from polykv_search.plan import Plan
from polykv_search.plan.plan import distinct_plans
from polykv_search.plan.names import METRICS, Metric

TEACHER_FORCED = ("kl", "nll", "miss", "lost")
DECODED = ("kl", "lost", "task")  # what a "task" objective measures: the decoding pass's own KL, and the score


class Measures(TypedDict, total=False):
    """One candidate's measurements (of one sample, or their mean over tasks): the teacher-forced ones (kl, nll,
    miss, lost) or, for a "task" objective, the decoded ones (kl, lost, task). A dict, so the guard's cache keeps
    its JSON form."""

    kl: float
    nll: float
    miss: float
    lost: float
    task: float


class EndToEndObjective:
    """Measure plans on calibration samples, each prefilled once when the objective is built; lower is better."""

    def __init__(self, lm: LoadedModel, samples: Sequence[Sample], *,
                 policies: Sequence[str | tuple[str, dict]], max_context_tokens: int | None = None,
                 batch_size: int = 16, metric: Metric = "kl",
                 on_prefill: Callable[[int, int], None] | None = None, question_aware: bool = False,
                 windowed: bool = False) -> None:
        """`policies`: the rankings the measured plans may use: registered policy names (their registered
        parameters) or (policy, params), as PrefillEngine's `scorers`. `on_prefill(done, total)` is called after
        each sample's prefill. `question_aware`: the question is compressed with the context. `windowed`: every
        plan is a per-layer window plan answered as TensorRT-LLM computes it (PrefillEngine.run_windowed: a
        prefill per plan and sample; "task" objective only)."""
        if metric not in METRICS:
            raise ConfigError(f"unknown end-to-end metric {metric!r}; choose one of {', '.join(METRICS)}")
        if windowed and metric != "task":
            raise ConfigError("plans answered as TensorRT-LLM's windows are measured by their answers: use the "
                              "task metric")
        self.metric, self.windowed = metric, windowed
        self.engine = PrefillEngine(lm, scorers=policies, max_context_tokens=max_context_tokens,
                                    question_aware=question_aware)
        self.states = []  # one prefill per sample, kept
        for sample in samples:
            self.states.append(self.engine.prefill(sample))
            if on_prefill:
                on_prefill(len(self.states), len(samples))
        self.states = [s for s in self.states if s.full_logprobs is not None]
        self.batch_size = batch_size
        self.evaluations = 0

    def many(self, plans: Sequence[Plan]) -> list[float]:
        """Mean metric of each plan, batched across plans for each sample."""
        return [m[self.metric] for m in self.measure(plans)]

    def measure(self, plans: Sequence[Plan]) -> list[Measures]:
        """Every metric of each plan, each a mean over samples (the mean over tasks, when samples are tagged with
        several tasks, so that each task family weighs the same)."""
        return self.measure_each(lambda _: plans, len(plans))

    def measure_each(self, plans_for: Callable[[Sample], Sequence[Plan]], count: int) -> list[Measures]:
        """As `measure`, but each sample answers its own `count` candidates, `plans_for(sample)`: candidate i is the
        i-th plan of every sample's list (the guard measures each sample with the plan made without it)."""
        return self.means(self.sample_rows(plans_for, count), count)

    def means(self, rows: Sequence[Sequence[Measures]], count: int) -> list[Measures]:
        """`sample_rows`' rows (every measured sample, in `states` order) -> each of the `count` candidates' metrics,
        the mean over tasks of each task's mean."""
        if not rows:  # no sample has a reference answer: nothing to tell the plans apart
            return [dict.fromkeys(DECODED if self.metric == "task" else TEACHER_FORCED, 0.0) for _ in range(count)]
        return mean_over_tasks([state.sample.task for state in self.states], rows)

    def sample_rows(self, plans_for: Callable[[Sample], Sequence[Plan]], count: int) -> list[list[Measures]]:
        """rows[s][i]: every metric of candidate i (of `plans_for(sample)`) on the s-th measured sample (`states`
        order), before any mean: what a paired comparison of two candidates needs."""
        rows = []
        for state in self.states:
            plans = list(plans_for(state.sample))
            if len(plans) != count:
                raise ValueError(f"sample {state.sample.id} got {len(plans)} candidate plans, not {count}")
            rows.append(self._sample_metrics(state, plans))
        self.evaluations += count
        return rows

    def _sample_metrics(self, state: PrefillState, plans: Sequence[Plan]) -> list[Measures]:
        if self.metric != "task":
            return self.engine.answer_metrics_many(state, plans, batch_size=self.batch_size)
        # one pass per batch: run_many's teacher-forced forward gives the KL (the tie-break's `lost`) and, its
        # cache rewound, starts the greedy decoding; no second cache build or forward
        # identical candidates (a guard's plan that is the engine's own setting, a fold plan equal to the whole
        # one) are answered once: for TensorRT-LLM windows each answer is a prefill of its own
        distinct, which = distinct_plans(plans)
        answered = (self.engine.run_windowed(state, distinct) if self.windowed else
                    self.engine.run_many(state, distinct, with_kl=True, batch_size=self.batch_size))
        metrics = [{"kl": r.kl, "lost": -math.expm1(-r.kl), "task": 1.0 - score_sample(state.sample, r.answer)}
                   for r in answered]
        return [dict(metrics[j]) for j in which]

    def __call__(self, plan: Plan) -> float:
        return self.many([plan])[0]


def mean_over_tasks(tasks: Sequence[str], rows: Sequence[Sequence[Measures]]) -> list[Measures]:
    """rows[s][i]: every metric of candidate i on sample s (of task tasks[s]) -> per candidate, the mean over tasks
    of each task's mean, so that each task family weighs the same whatever its sample count."""
    per_task: dict[str, list[Sequence[dict[str, float]]]] = {}
    for task, sample_rows in zip(tasks, rows):
        per_task.setdefault(task, []).append(sample_rows)
    count = len(rows[0]) if rows else 0
    out = []
    for i in range(count):
        task_means = [{k: sum(r[i][k] for r in runs) / len(runs) for k in runs[0][i]} for runs in per_task.values()]
        out.append({k: sum(t[k] for t in task_means) / len(task_means) for k in task_means[0]})
    return out

