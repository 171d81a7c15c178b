"""`calibrate`: one full-cache prefill per sample, the reference answer teacher-forced as decoding, per-sample
checkpoints (so an interrupted run resumes), and the aggregated profile written atomically.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import DynamicCache

from polykv_search import __version__
from polykv_search.calibration.around import (
    around_probes,
    background,
    choose_backgrounds,
    plan_backgrounds,
)
from polykv_search.calibration.budgets import DEFAULT_BUDGETS
from polykv_search.calibration.capture import LayerCapture, SampleRecord
from polykv_search.calibration.profile import (
    AROUND_BASE,
    AROUND_KL,
    COST_KINDS,
    HEAD_FISHER,
    HEAD_FISHER_PROBED,
    HEAD_KL,
    OPTIONAL_COST_KINDS,
    PROFILE_FORMAT,
    PROFILE_VERSION,
    Profile,
    tensors_sha256,
)
from polykv_search.calibration.head_fisher import (DEFAULT_DRAWS, DEFAULT_PROBE_ABOVE, DEFAULT_PROBE_SHARE,
                                                   answer_gradients, cells_to_probe, corrected, detached_copy)
from polykv_search.calibration.layer_kl import head_probes, layer_probes, probe_state
from polykv_search.calibration.shards import SHARD_KEY, Shard
from polykv_search.calibration.signals import SIGNAL_NAMES
from polykv_search.checkpoints import (CHECKPOINT_CHECKSUM, CheckpointRun, checkpoint_sha256, damaged_checkpoint,
                                      folder_lock, prepare_checkpoints, read_sealed_checkpoint, samples_digest)
from polykv_search.data import Sample, build_prompt
from polykv_search.errors import ConfigError, DataError, ProfileError
from polykv_search.io import file_sha256, write_atomic, write_sealed_json
from polykv_search.engine import PrefillEngine
from polykv_search.models import LoadedModel
from polykv_search.plan import PlanFile, load_plan, uniform_plan
from polykv_search.policies import DEFAULT_POLICIES, POLICIES, check_policy_names, policy_params

logger = logging.getLogger(__name__)
# a checkpoint's optional per-sample arrays
PROBE_ARRAYS = (*OPTIONAL_COST_KINDS, AROUND_KL, AROUND_BASE, HEAD_KL, HEAD_FISHER, HEAD_FISHER_PROBED)



@dataclass(frozen=True)
class CalibrationConfig:
    policies: tuple[str, ...] = DEFAULT_POLICIES
    budgets: tuple[int, ...] = DEFAULT_BUDGETS
    window: int = 64  # observation window for CAKE's entropy and variance, as SnapKV's default
    n_sink: int = 4  # StreamingLLM's sink count, for the sink-mass signal
    recent: int = 64  # recent-window size for the recent-mass signal
    max_context_tokens: int | None = None  # None: the model's context length
    layer_kl: bool = False  # slower mode: KL to the full cache with one layer compressed, per policy and budget
    head_kl: bool = False  # slower still: the same with one KV head compressed (the cost of per-head plans)
    head_fisher: bool = False  # the per-head cost estimated to second order from answer gradients, large cells probed
    draws: int = DEFAULT_DRAWS  # answer draws (backward passes) per sample for head_fisher
    probe_above: float = DEFAULT_PROBE_ABOVE  # head_fisher: probe exactly the cells estimated above this (inf: none),
    probe_share: float = DEFAULT_PROBE_SHARE  # at most this share of each sample's cells, the largest first
    around: tuple[int, ...] = ()  # operating points: probes with every other layer at this uniform budget
    around_policy: str | None = None  # the background's policy (None: the best uniform one on the samples)
    around_plan: str | None = None  # or: a plan file whose rungs at the --around budgets are the backgrounds
    question_aware: bool = False  # the question prefilled and compressed with the context (kvpress's second setting)

    def validated(self) -> CalibrationConfig:
        policies = tuple(check_policy_names(list(self.policies)))
        if not self.budgets:
            raise ConfigError("the budget grid is empty; pass e.g. --budgets 16,32,64,128,256,512")
        bad = [b for b in self.budgets if int(b) < 1]
        if bad:
            raise ConfigError(f"budget grid values must be at least 1 token, got {bad}; "
                              "pass positive integers, e.g. --budgets 16,32,64,128")
        if self.draws < 1:
            raise ConfigError(f"--draws must be at least 1, got {self.draws}")
        if not self.probe_above >= 0:
            raise ConfigError(f"--probe-above must be a mean KL per answer token of at least 0 (inf: probe no cell), "
                              f"got {self.probe_above}")
        if not 0 <= self.probe_share <= 1:
            raise ConfigError(f"--probe-share must be a share of the cells between 0 and 1, got {self.probe_share}")
        if self.window < 1 or self.recent < 1 or self.n_sink < 0:
            raise ConfigError("--window and --recent must be at least 1 and --n-sink at least 0")
        if any(int(b) < 1 for b in self.around):
            raise ConfigError(f"--around budgets must be at least 1 token per layer, got {list(self.around)}")
        if self.around_policy is not None and self.around_policy not in policies:
            raise ConfigError(f"--around-policy {self.around_policy!r} is not among the calibrated policies "
                              f"({', '.join(policies)}); add it to --policies")
        around = tuple(sorted({int(b) for b in self.around}))
        if self.around_plan is not None:
            if self.around_policy is not None:
                raise ConfigError("--around-policy and --around-plan both set the background; pass one of them")
            if not around:  # every whole-token rung of the plan
                around = tuple(sorted(int(b) for b in PlanFile.load(self.around_plan).budgets
                                      if float(b).is_integer()))
        return replace(self, policies=policies, budgets=tuple(sorted({int(b) for b in self.budgets})),
                       probe_above=float(self.probe_above), probe_share=float(self.probe_share), around=around)


@dataclass
class SampleResult:
    """One calibration sample: its size, whether it was skipped (too short) and why, and how it was obtained."""

    index: int
    sample_id: str
    task: str
    context_tokens: int
    suffix_tokens: int
    truncated: bool
    skipped: str | None = None
    seconds: float = 0.0
    resumed: bool = False  # read from an earlier run's checkpoint, not computed now


@dataclass
class CalibrationRun:
    profile: Profile
    path: Path
    results: list[SampleResult] = field(default_factory=list)
    seconds: float = 0.0


ProgressFn = Callable[[SampleResult], None]


def calibrate_model(lm: LoadedModel, samples: Sequence[Sample], *, config: CalibrationConfig = CalibrationConfig(),
              data_sources: Sequence[str] = (), out_dir: str | Path, resume: bool = False,
              progress: ProgressFn | None = None, shard: Shard | tuple[int, int] | str | None = None,
              ) -> CalibrationRun:
    """Calibrate `lm` on `samples` and write `out_dir/profile.safetensors`; with `shard` (K, N) only on the
    samples at positions i with i mod N == K - 1, the header recording which (calibration/shards.py)."""
    config = config.validated()
    if not samples:
        raise DataError("the calibration data set is empty; pass a --data file with at least one row")
    selection = list(samples)
    if shard is not None:
        shard = Shard.of(shard)
        if config.around and config.around_policy is None and config.around_plan is None:
            raise ConfigError("--shard with --around needs --around-policy or --around-plan: a background chosen "
                              "on each shard's own samples would differ between shards")
        samples = shard.select(selection)
    out_dir = Path(out_dir)
    max_ctx = config.max_context_tokens or lm.info.max_context or 8192
    with folder_lock(out_dir):
        return _calibrate_locked(lm, samples, config=config, data_sources=data_sources, out_dir=out_dir,
                                 resume=resume, progress=progress, max_ctx=max_ctx, shard=shard,
                                 selection=selection)


def _calibrate_locked(lm: LoadedModel, samples: Sequence[Sample], *, config: CalibrationConfig,
                      data_sources: Sequence[str], out_dir: Path, resume: bool, progress: ProgressFn | None,
                      max_ctx: int, shard: Shard | None = None, selection: Sequence[Sample] = ()) -> CalibrationRun:
    ckpt_dir = out_dir / "checkpoints"
    # each sample is calibrated on its own, so more samples (or a few edited) reuse the others' checkpoints; not
    # with --around (its backgrounds are chosen on all the samples) nor --shard (its share is of all of them)
    independent = shard is None and not config.around
    fingerprint = _fingerprint(lm, None if independent else samples, config, data_sources, max_ctx)
    if shard is not None:
        fingerprint["shard"] = {"name": shard.name, "selection": samples_digest(selection)}
    run = prepare_checkpoints(ckpt_dir, fingerprint, resume=resume, defaults=FINGERPRINT_DEFAULTS,
                              samples=samples if independent else None, suffix=".safetensors",
                              sample_id_of=_checkpoint_sample_id)
    if resume:
        run.say_reuse(samples)

    capture = LayerCapture(lm.model, lm.info, policies=config.policies, budgets=config.budgets,
                           window=config.window, n_sink=config.n_sink, recent=config.recent)
    min_context = _min_context(config)
    probe = None
    if config.layer_kl or config.head_kl or config.around or _probes_fisher(config):
        # scores nothing: calibrate's prefill hands it the rankings
        probe = PrefillEngine(lm, max_context_tokens=max_ctx, question_aware=config.question_aware)
    backgrounds = _backgrounds(lm, samples, config, ckpt_dir, max_ctx, resume=resume) if config.around else []
    started = time.perf_counter()
    records: list[SampleRecord] = []
    results: list[SampleResult] = []
    with capture.attached(), torch.inference_mode():
        for index, sample in enumerate(samples):
            ckpt = run.path(index, sample)
            t0 = time.perf_counter()
            loaded = _load_checkpoint(ckpt, run, index, sample) if resume and ckpt.exists() else None
            if loaded is not None:
                record, result = loaded
                result.resumed = True
            else:
                record, result = _calibrate_one(lm, capture, sample, index, max_ctx, min_context, probe=probe,
                                                layer_kl=config.layer_kl, head_kl=config.head_kl,
                                                draws=config.draws if config.head_fisher else 0,
                                                fisher_probes=(config.probe_above, config.probe_share),
                                                backgrounds=backgrounds, question_aware=config.question_aware)
                _save_checkpoint(ckpt, record, result, run.stamp(sample))
            result.seconds = time.perf_counter() - t0
            results.append(result)
            if record is not None:
                records.append(record)
            if progress:
                progress(result)
    if not records:
        raise DataError("no sample was long enough to calibrate on (each needs more than "
                        f"{min_context} context tokens); use longer contexts")
    profile = _assemble(lm, config, records, [r for r in results if r.skipped is None], data_sources, max_ctx,
                        backgrounds)
    if shard is not None:  # which shard of which selection: what merge-profiles checks and orders by
        profile.header[SHARD_KEY] = shard.record(selection, [r.index for r in results if r.skipped is None],
                                                 dtype=str(getattr(lm.model, "dtype", "")), device=str(lm.device))
    path = profile.save(out_dir / "profile.safetensors")
    return CalibrationRun(profile=profile, path=path, results=results, seconds=time.perf_counter() - started)


def _probes_fisher(config: CalibrationConfig) -> bool:
    """Whether the Fisher estimate's large cells are probed (a finite --probe-above)."""
    return config.head_fisher and math.isfinite(config.probe_above)


def _min_context(config: CalibrationConfig) -> int:
    windows = [POLICIES[p].params.get("window_size", 0) for p in config.policies]
    return max([config.window, config.n_sink, *windows]) + 1


def _backgrounds(lm: LoadedModel, samples: Sequence[Sample], config: CalibrationConfig, ckpt_dir: Path,
                 max_ctx: int, *, resume: bool) -> list[dict]:
    """The `--around` backgrounds, chosen once (a prefill per sample) and kept with the checkpoints, so a resumed
    run probes around the same ones."""
    path = ckpt_dir / "around.json"
    if resume and path.exists():
        return read_sealed_checkpoint(path, "the --around backgrounds")["backgrounds"]
    if config.around_plan is not None:
        plan_file = load_plan(config.around_plan, model=lm.info)
        chosen = plan_backgrounds(plan_file, budgets=config.around, policies=config.policies,
                                  name=Path(config.around_plan).stem)
    elif config.around_policy is not None:
        chosen = [background(b, config.around_policy, uniform_plan(lm.info, policy=config.around_policy, budget=b),
                             kind="uniform") for b in config.around]
    else:
        logger.info("choosing the --around backgrounds: one prefill per sample, %d uniform rows each",
                    len(config.around) * len(config.policies))
        engine = PrefillEngine(lm, scorers=config.policies, max_context_tokens=max_ctx,
                               question_aware=config.question_aware)
        chosen = choose_backgrounds(engine, samples, info=lm.info, budgets=config.around, policies=config.policies)
    write_sealed_json(path, {"backgrounds": chosen})
    return chosen


def _calibrate_one(lm: LoadedModel, capture: LayerCapture, sample: Sample, index: int, max_ctx: int,
                   min_context: int, *, probe=None, layer_kl: bool = True, head_kl: bool = False,
                   draws: int = 0, fisher_probes: tuple[float, float] = (math.inf, 0.0),
                   backgrounds: Sequence[dict] = (), question_aware: bool = False,
                   ) -> tuple[SampleRecord | None, SampleResult]:
    parts = build_prompt(sample, lm.tokenizer, max_context_tokens=max_ctx, question_aware=question_aware)
    suffix_ids = list(parts.question_ids) + list(parts.answer_ids)
    result = SampleResult(index=index, sample_id=str(sample.id), task=sample.task,
                          context_tokens=len(parts.context_ids), suffix_tokens=len(suffix_ids),
                          truncated=parts.truncated)
    if len(parts.context_ids) <= min_context or not suffix_ids:
        result.skipped = f"context of {len(parts.context_ids)} tokens is too short (needs > {min_context})"
        logger.warning("sample %s skipped: %s", sample.id, result.skipped)
        return None, result
    device = lm.device
    context = torch.tensor([parts.context_ids], device=device)  # (1, T)
    suffix = torch.tensor([suffix_ids], device=device)  # (1, S)
    cache = DynamicCache(config=lm.model.config)
    capture.start_sample(context.shape[1])
    try:
        capture.phase = "prefill"
        lm.model(input_ids=context, past_key_values=cache, use_cache=True, logits_to_keep=1)
        capture.phase = None
        probes = None
        if probe is not None:  # before the decoding pass appends to the cache
            state = probe_state(probe, sample, parts, cache, capture.rankings())
            grid = {"info": lm.info, "policies": capture.policies, "budgets": capture.budgets}
            probes = layer_probes(probe, state, **grid) if layer_kl else {}
            if head_kl:
                probes[HEAD_KL] = head_probes(probe, state, **grid)
            if backgrounds:
                probes.update(around_probes(probe, state, backgrounds=backgrounds, **grid))
        rankings = capture.rankings()
        if draws:  # the decoding pass's cost curves turn these into the Fisher estimate per KV head
            capture.answer_grads = answer_gradients(lm.model, capture.layer_ids, cache, parts, draws=draws,
                                                    seed=zlib.crc32(str(sample.id).encode()))
            capture.n_answer = len(parts.answer_ids)
        capture.phase = "decode"
        decoding = detached_copy(cache) if draws else cache  # the Fisher cells' probes need the context's cache
        lm.model(input_ids=suffix, past_key_values=decoding, use_cache=True, logits_to_keep=1)
    finally:
        capture.phase = None
    record = capture.finish_sample()
    if record.head_fisher is not None:
        probes = {**(probes or {}), **_fisher_cells(probe, sample, parts, cache, rankings, record.head_fisher,
                                                    capture=capture, lm=lm, rule=fisher_probes)}
    record.layer_probes = probes
    return record, result


def _fisher_cells(engine, sample: Sample, parts, cache: DynamicCache, rankings, estimate: torch.Tensor, *,
                  capture: LayerCapture, lm: LoadedModel, rule: tuple[float, float]) -> dict[str, torch.Tensor]:
    """head_fisher: the estimate, with the cells chosen by `rule` (probe_above, probe_share) replaced by their
    probes' KL, and the mask of those cells (head_fisher_probed)."""
    above, share = rule
    chosen = cells_to_probe(estimate, above, share) if engine is not None and math.isfinite(above) else \
        torch.zeros_like(estimate, dtype=torch.bool)
    if bool(chosen.any()):
        state = probe_state(engine, sample, parts, cache, rankings)
        measured = head_probes(engine, state, info=lm.info, policies=capture.policies, budgets=capture.budgets,
                               only=chosen)
        estimate = corrected(estimate, chosen, measured)  # every chosen cell was probed (its estimate is > 0)
    return {HEAD_FISHER: estimate, HEAD_FISHER_PROBED: chosen.to(torch.uint8)}


def _save_checkpoint(path: Path, record: SampleRecord | None, result: SampleResult, stamp: dict[str, str]) -> None:
    tensors = {}
    if record is not None:
        tensors = {"mass_lost": record.mass_lost, "out_err": record.out_err,
                   **{f"signal.{k}": v for k, v in record.signals.items()}}
        tensors.update(record.layer_probes or {})
    else:
        tensors = {"skipped": torch.zeros(1)}
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    meta = {"result": json.dumps(asdict(result)), **stamp}
    meta[CHECKPOINT_CHECKSUM] = checkpoint_sha256(tensors_sha256(tensors), meta)
    write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def _load_checkpoint(path: Path, run: CheckpointRun, index: int,
                     sample: Sample) -> tuple[SampleRecord | None, SampleResult] | None:
    """A checkpoint read back: refused, naming its sample, when damaged (unreadable, or its content does not match
    its checksum) or made by another run; None when it was made for another sample (edited since, or the data set
    changed order): the caller calibrates that sample again."""
    sample_name = f"sample {index + 1}, id {sample.id}"
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
        arrays = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for a damaged file
        raise damaged_checkpoint(path, sample_name, f"unreadable ({type(exc).__name__})") from exc
    if CHECKPOINT_CHECKSUM not in meta:
        raise damaged_checkpoint(path, sample_name, "it has no checksum (written by an older polykv-search, or edited)")
    if meta[CHECKPOINT_CHECKSUM] != checkpoint_sha256(tensors_sha256(arrays), meta):
        raise damaged_checkpoint(path, sample_name, "its content does not match its checksum")
    if not run.reusable(path, meta, sample):
        logger.warning("--resume: %s changed since its checkpoint was written; calibrating it again", sample_name)
        return None
    try:
        result = SampleResult(**{k: v for k, v in json.loads(meta["result"]).items() if k != "resumed"})
        result.index = index  # where the sample is now (a grown or reordered run)
    except (KeyError, TypeError, ValueError) as exc:
        raise damaged_checkpoint(path, sample_name, "its result does not parse") from exc
    if result.skipped is not None:
        return None, result
    signals = {k.split(".", 1)[1]: v for k, v in arrays.items() if k.startswith("signal.")}
    return SampleRecord(mass_lost=arrays["mass_lost"], out_err=arrays["out_err"], signals=signals,
                        layer_probes={k: arrays[k] for k in PROBE_ARRAYS if k in arrays} or None), result


def _checkpoint_sample_id(path: Path) -> str | None:
    """The sample id an older checkpoint's result names (None when unreadable)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return str(json.loads((handle.metadata() or {})["result"])["sample_id"])
    except Exception:  # safetensors raises its own error types for a damaged file
        return None


# Written by some versions, left out by others (query-agnostic runs leave it out, as runs before the setting did)
FINGERPRINT_DEFAULTS = {"config.question_aware": False}


def _fingerprint(lm: LoadedModel, samples: Sequence[Sample] | None, config: CalibrationConfig,
                 data_sources: Sequence[str], max_ctx: int) -> dict[str, Any]:
    """What every checkpoint depends on; `samples` where the checkpoints depend on the whole set (else each one
    names its own sample)."""
    described = asdict(config)
    if not described["question_aware"]:  # absent in query-agnostic runs: checkpoints from before the setting resume
        del described["question_aware"]
    found = {"model": lm.info.model_id, "revision": lm.info.revision, "dtype": str(getattr(lm.model, "dtype", "")),
             "device": str(lm.device), "config": described, "max_context_tokens": max_ctx,
             "data": list(data_sources), "format_version": PROFILE_VERSION}
    if samples is not None:
        found["samples"] = samples_digest(samples)
    if config.around_plan is not None:  # an edited plan file is another background
        found["around_plan_sha256"] = file_sha256(Path(config.around_plan))
    return found


def _versions() -> dict[str, str]:
    found = {"python": platform.python_version(), "polykv-search": __version__}
    for pkg in ("torch", "transformers", "kvpress"):
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            found[pkg] = "not installed"
    return found


def _data_entries(sources: Sequence[str]) -> list[dict[str, str]]:
    entries = []
    for source in sources:
        path = Path(source)
        entries.append({"source": str(source), "sha256": file_sha256(path) if path.is_file() else "hub"})
    return entries


def _assemble(lm: LoadedModel, config: CalibrationConfig, records: list[SampleRecord],
              results: list[SampleResult], data_sources: Sequence[str], max_ctx: int,
              backgrounds: Sequence[dict] = ()) -> Profile:
    arrays = {
        "mass_lost": torch.stack([r.mass_lost for r in records]),  # (N, L, H_kv, P, G)
        "out_err": torch.stack([r.out_err for r in records]),
        "context_tokens": torch.tensor([r.context_tokens for r in results], dtype=torch.int64),
    }
    probed: list[str] = []
    if config.layer_kl:  # kinds every sample has (checkpoints from an older version may lack layer_nll)
        probed = [k for k in OPTIONAL_COST_KINDS if all(k in (r.layer_probes or {}) for r in records)]
        for kind in probed:
            arrays[kind] = torch.stack([r.layer_probes[kind] for r in records])  # (N, L, 1, P, G)
    for kind, wanted in ((HEAD_KL, config.head_kl), (HEAD_FISHER, config.head_fisher)):
        if wanted:
            arrays[kind] = torch.stack([r.layer_probes[kind] for r in records])  # (N, L, H_kv, P, G)
            probed.append(kind)
    if config.head_fisher:
        arrays[HEAD_FISHER_PROBED] = torch.stack([r.layer_probes[HEAD_FISHER_PROBED] for r in records])
    if backgrounds:
        for kind in (AROUND_KL, AROUND_BASE):  # (N, L, A, P, G) and (N, A)
            arrays[kind] = torch.stack([r.layer_probes[kind] for r in records])
        probed.append(AROUND_KL)
    for name in SIGNAL_NAMES:
        arrays[f"signal.{name}"] = torch.stack([r.signals[name] for r in records])  # (N, L, H_kv)
    policies = []
    for name in config.policies:
        policies.append({"name": name, "press": POLICIES[name].press, "params": policy_params(name),
                         "ranking": POLICIES[name].ranking})
    header = {
        "format": PROFILE_FORMAT,
        "format_version": PROFILE_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": lm.info.to_dict(),
        "policies": policies,
        "budgets": list(config.budgets),
        "budget_unit": "context tokens kept per layer",
        "options": {"window": config.window, "n_sink": config.n_sink, "recent": config.recent,
                    "max_context_tokens": max_ctx,
                    "decoding_queries": ("end of turn" if config.question_aware else "question") + " + reference answer",
                    **({"question_aware": True} if config.question_aware else {}),
                    "cost_kinds": [*COST_KINDS, *probed],
                    **({"answer_draws": config.draws, "probe_above": config.probe_above,
                        "probe_share": config.probe_share}
                       if config.head_fisher else {})},
        "signals": list(SIGNAL_NAMES),
        "data": _data_entries(data_sources),
        "samples": [{"id": r.sample_id, "task": r.task, "context_tokens": r.context_tokens,
                     "suffix_tokens": r.suffix_tokens, "truncated": r.truncated} for r in results],
        "versions": _versions(),
    }
    if backgrounds:
        header["around"] = list(backgrounds)
    return Profile(header=header, arrays=arrays)
