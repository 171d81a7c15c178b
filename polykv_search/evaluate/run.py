"""`evaluate`: per sample one prefill, every method answered from it, scored; per-sample checkpoints so an
interrupted run resumes; the report with gap recovery written at the end."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from polykv_search.checkpoints import prepare_checkpoints
from polykv_search.data import Sample
from polykv_search.errors import DataError
from polykv_search.evaluate.engine import EvaluationEngine, Method, MethodResult
from polykv_search.evaluate.methods import MethodSet
from polykv_search.evaluate.metrics import score_sample
from polykv_search.io import write_json_atomic
from polykv_search.models import LoadedModel

logger = logging.getLogger(__name__)


@dataclass
class ScoredResult:
    sample_id: str
    task: str
    method: str
    answer: str
    score: float
    kl: float | None
    kept_all_layers: list[int]
    context_tokens: int


ProgressFn = Callable[[int, int], None]


def evaluate(lm: LoadedModel, samples: Sequence[Sample], methods: MethodSet, *, out_dir: str | Path,
             resume: bool = False, with_kl: bool = True, batch_size: int = 16,
             max_context_tokens: int | None = None, progress: ProgressFn | None = None) -> list[ScoredResult]:
    """Score every method on every sample; returns one ScoredResult per (sample, method)."""
    if not samples:
        raise DataError("the evaluation data set is empty; pass a --data file with at least one row")
    missing = [s.id for s in samples if not s.answers]
    if missing:
        raise DataError(f"samples {', '.join(map(str, missing[:5]))} have no answers; evaluation needs "
                        "reference answers (the `answers` column)")
    out_dir = Path(out_dir)
    ckpt_dir = out_dir / "checkpoints"
    prepare_checkpoints(ckpt_dir, _fingerprint(lm, samples, methods, with_kl, max_context_tokens), resume=resume)
    engine = EvaluationEngine(lm, policies=sorted(methods.policies), variants=methods.variants,
                              max_context_tokens=max_context_tokens)
    full = engine.full_method()
    results: list[ScoredResult] = []
    for index, sample in enumerate(samples):
        ckpt = ckpt_dir / f"sample-{index:05d}.json"
        if resume and ckpt.exists():
            rows = [ScoredResult(**row) for row in json.loads(ckpt.read_text())]
        else:
            state = engine.prefill(sample)
            answered = [engine.run(state, full, with_kl=False)]
            answered += engine.run_many(state, methods.methods, with_kl=with_kl, batch_size=batch_size)
            rows = [_scored(r, sample, state.n_context) for r in answered]
            write_json_atomic(ckpt, [asdict(r) for r in rows])
        results.extend(rows)
        if progress:
            progress(index + 1, len(samples))
    logger.info("evaluated %d samples with %d prefills", len(samples), engine.prefills)
    return results


def _scored(result: MethodResult, sample: Sample, n_context: int) -> ScoredResult:
    score = score_sample(sample, result.answer)
    kl = 0.0 if result.method == "full" else result.kl
    return ScoredResult(sample_id=result.sample_id, task=result.task, method=result.method, answer=result.answer,
                        score=float(score), kl=kl, kept_all_layers=result.kept_all_layers, context_tokens=n_context)


def _fingerprint(lm: LoadedModel, samples: Sequence[Sample], methods: MethodSet, with_kl: bool,
                 max_context: int | None) -> dict:
    ids = hashlib.sha256("\n".join(f"{s.id}\t{s.task}\t{len(s.context)}" for s in samples).encode()).hexdigest()
    method_sig = hashlib.sha256(json.dumps([asdict(m) for m in methods.methods], sort_keys=True,
                                           default=str).encode()).hexdigest()
    return {"model": lm.info.model_id, "revision": lm.info.revision, "samples": ids, "methods": method_sig,
            "with_kl": with_kl, "max_context": max_context}


def method_index(methods: Sequence[Method]) -> dict[str, Method]:
    return {m.key: m for m in methods}


def elapsed(started: float) -> float:
    return round(time.perf_counter() - started, 2)
