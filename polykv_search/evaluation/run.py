"""`evaluate`: per sample one prefill, every method answered from it, scored; per-sample checkpoints so an
interrupted run resumes."""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from polykv_search.checkpoints import (CheckpointRun, damaged_checkpoint, folder_lock, prepare_checkpoints,
                                      read_sealed_checkpoint)
from polykv_search.data import Sample
from polykv_search.data.metrics import score_sample
from polykv_search.engine import Answer, PrefillEngine
from polykv_search.errors import DataError, ProfileError
from polykv_search.evaluation.methods import FULL, Method
from polykv_search.io import write_sealed_json
from polykv_search.models import LoadedModel
from polykv_search.plan.plan import distinct_plans

logger = logging.getLogger(__name__)


@dataclass
class ScoredResult:
    """One method's answer to one sample, with the task's score and the KL to the full cache."""

    sample_id: str
    task: str
    method: str  # Method.key
    answer: str
    score: float
    kl: float | None
    kept_all_layers: list[int]
    context_tokens: int
    kv_entries: int | None = None  # context entries the cache keeps over compressible layers and KV heads
    kv_bytes: int | None = None  # bytes the whole cache allocates as the runtime lays it out


ProgressFn = Callable[[int, int], None]
CHECKPOINT_VERSION = 3  # 2: {"run": digest, "rows": [...]} per sample; 3: identical plans answered once


def score_methods(lm: LoadedModel, samples: Sequence[Sample], methods: Sequence[Method], *, out_dir: str | Path,
                  resume: bool = False, with_kl: bool = True, batch_size: int = 16,
                  max_context_tokens: int | None = None, progress: ProgressFn | None = None,
                  question_aware: bool = False) -> list[ScoredResult]:
    """Score the full cache and every method on every sample; one ScoredResult per (sample, method).
    `question_aware`: every method compresses the question with the context (kvpress's second setting)."""
    if not samples:
        raise DataError("the evaluation data set is empty; pass a --data file with at least one row")
    missing = [s.id for s in samples if not s.answers]
    if missing:
        raise DataError(f"samples {', '.join(map(str, missing[:5]))} have no answers; evaluation needs "
                        "reference answers (the `answers` column)")
    out_dir = Path(out_dir)
    with folder_lock(out_dir):
        return _score_locked(lm, samples, methods, out_dir=out_dir, resume=resume, with_kl=with_kl,
                             batch_size=batch_size, max_context_tokens=max_context_tokens, progress=progress,
                             question_aware=question_aware)


def _score_locked(lm: LoadedModel, samples: Sequence[Sample], methods: Sequence[Method], *, out_dir: Path,
                  resume: bool, with_kl: bool, batch_size: int, max_context_tokens: int | None,
                  progress: ProgressFn | None, question_aware: bool) -> list[ScoredResult]:
    ckpt_dir = out_dir / "checkpoints"
    fingerprint = _fingerprint(lm, methods, with_kl, max_context_tokens)
    if question_aware:  # absent in query-agnostic runs: their checkpoints stay valid
        fingerprint["question_aware"] = True
    run = prepare_checkpoints(ckpt_dir, fingerprint, resume=resume, samples=samples,  # more samples reuse these
                              sample_id_of=_checkpoint_sample_id)
    if resume:
        run.say_reuse(samples)
    engine = PrefillEngine.for_plans(lm, [p for m in methods for p in m.plans],
                                     policies=[m.policy for m in methods if m.policy],
                                     max_context_tokens=max_context_tokens, question_aware=question_aware)
    results: list[ScoredResult] = []
    if progress:  # the stage starts now: a heartbeat during the first (long) sample names it, not the stage before
        progress(0, len(samples))
    for index, sample in enumerate(samples):
        ckpt = run.path(index, sample)
        rows = _load_checkpoint(ckpt, run, index, sample) if resume and ckpt.exists() else None
        if rows is None:
            state = engine.prefill(sample)
            plans = [m.plan_for(state) for m in methods]
            distinct, which = distinct_plans(plans, [m.windowed for m in methods])
            windows = sorted({which[i] for i, m in enumerate(methods) if m.windowed})
            evicting = [j for j in range(len(distinct)) if j not in windows]
            once = dict(zip(evicting, engine.run_many(state, [distinct[j] for j in evicting], with_kl=with_kl,
                                                      batch_size=batch_size)))  # one prefill serves them all
            once |= dict(zip(windows, engine.run_windowed(state, [distinct[j] for j in windows],
                                                          with_kl=with_kl)))  # TensorRT-LLM's: a prefill each
            answered = [engine.run(state, None, with_kl=False)] + [once[i] for i in which]
            rows = [_scored(method, answer, sample, state.n_context, engine.footprint(state, plan))
                    for method, plan, answer in zip([FULL, *methods], [None, *plans], answered)]
            write_sealed_json(ckpt, {**run.stamp(sample), "rows": [asdict(r) for r in rows]})
        results.extend(rows)
        if progress:
            progress(index + 1, len(samples))
    logger.info("evaluated %d samples with %d prefills", len(samples), engine.prefills)
    return results


def _load_checkpoint(path: Path, run: CheckpointRun, index: int, sample: Sample) -> list[ScoredResult] | None:
    """A checkpoint's rows; None when it was made for another sample than `sample` (edited since, or the data set
    changed order): the caller answers it again."""
    named = f"sample {index + 1}, id {sample.id}"
    stored = read_sealed_checkpoint(path, named)
    if not run.reusable(path, stored, sample):
        logger.warning("--resume: %s changed since its checkpoint was written; answering it again", named)
        return None
    try:
        return [ScoredResult(**row) for row in stored["rows"]]
    except (TypeError, KeyError) as exc:
        raise damaged_checkpoint(path, named, "its rows do not parse") from exc


def _checkpoint_sample_id(path: Path) -> str | None:
    """The sample id an older checkpoint's rows name (None when unreadable)."""
    try:
        return str(read_sealed_checkpoint(path, path.name)["rows"][0]["sample_id"])
    except (ProfileError, KeyError, IndexError, TypeError):
        return None


def _scored(method: Method, answer: Answer, sample: Sample, n_context: int,
            footprint: tuple[int, int]) -> ScoredResult:
    kl = 0.0 if method.family == "full" else answer.kl
    return ScoredResult(sample_id=answer.sample_id, task=answer.task, method=method.key, answer=answer.answer,
                        score=float(score_sample(sample, answer.answer)), kl=kl,
                        kept_all_layers=answer.kept_all_layers, context_tokens=n_context, kv_entries=footprint[0],
                        kv_bytes=footprint[1])


def _fingerprint(lm: LoadedModel, methods: Sequence[Method], with_kl: bool, max_context: int | None) -> dict:
    """What every sample's rows depend on (each checkpoint names its own sample)."""
    described = [{"name": m.name, "family": m.family, "budget": m.average_budget, "policy": m.policy,
                  "plan": None if m.plan is None else m.plan.to_dict()["layers"]} for m in methods]
    described += [{"rungs": [[p.context.to_dict() if p.context else None, p.to_dict()["layers"]] for p in m.rungs]}
                  for m in methods if m.rungs]  # absent for plans without rungs: their checkpoints stay valid
    described += [{"windowed": m.key} for m in methods if m.windowed]  # likewise for runs without trtllm plans
    method_sig = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()
    return {"model": lm.info.model_id, "revision": lm.info.revision, "dtype": str(getattr(lm.model, "dtype", "")),
            "device": str(lm.device), "methods": method_sig, "with_kl": with_kl,
            "max_context": max_context, "format_version": CHECKPOINT_VERSION}
