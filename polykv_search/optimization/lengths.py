"""Plans by prompt length: at each budget, one rung per range of prompt lengths, each made and guarded on
calibration samples of its own length, and the runtime picks the rung by the prompt's length.

A budget is absolute tokens per KV head: a head given 2,048 tokens keeps the whole of a 2k-token context and a
fraction of a 7k one, so a choice made on short samples does not transfer to long ones (docs/long-context.md).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from polykv_search.calibration import CalibrationRun
from polykv_search.calibration.profile import Profile
from polykv_search.data import DataSpec, resolve_samples
from polykv_search.engine.progress import Progress
from polykv_search.errors import ConfigError
from polykv_search.models import LoadedModel
from polykv_search.models.info import ModelInfo
from polykv_search.optimization.crossfit import crossfit_obstacle
from polykv_search.optimization.guard import GuardRung, guard_plan
from polykv_search.optimization.run import OptimizeConfig
from polykv_search.optimization.targets import engine_settings
from polykv_search.plan import Plan, PlanFile
from polykv_search.plan.plan import FAR_BEYOND_CALIBRATION, ContextRange

logger = logging.getLogger(__name__)


@dataclass
class LengthRun:
    """One calibration split of `run`: the prompt lengths its rungs serve, its calibration, and its guard."""

    context: ContextRange
    calibration: CalibrationRun
    guard: list[GuardRung] = field(default_factory=list)
    guard_samples: int = 0


def calibrated_lengths(profile: Profile) -> tuple[int, int] | None:
    """(shortest, longest) context tokens of the profile's calibration samples; None when it does not record them."""
    lengths = profile.arrays.get("context_tokens")
    if lengths is None or lengths.numel() == 0:
        return None
    return int(lengths.min()), int(lengths.max())


def length_ranges(calibrated: Sequence[tuple[int, int]], *, strict: bool = False) -> list[ContextRange]:
    """The prompt lengths each bucket's rung serves, given each bucket's calibration lengths (in the buckets'
    order, shortest first): together they cover every length, each boundary the geometric mean of the gap between
    two buckets. `strict`: the last range ends FAR_BEYOND_CALIBRATION past its longest calibration context and the
    runtime refuses longer prompts. ConfigError when two buckets' lengths overlap or are out of order."""
    for (low_a, high_a), (low_b, high_b) in zip(calibrated, calibrated[1:]):
        if low_b <= high_a:
            raise ConfigError(f"calibration splits of {low_a}-{high_a} and {low_b}-{high_b} context tokens overlap; "
                              "give splits of distinct lengths (e.g. calib.jsonl and calib_long.jsonl), shortest first")
    ranges = []
    for k, made in enumerate(calibrated):
        low = 0 if k == 0 else math.isqrt(calibrated[k - 1][1] * made[0]) + 1
        if k + 1 < len(calibrated):
            high: int | None = math.isqrt(made[1] * calibrated[k + 1][0])
        else:
            high = math.ceil(made[1] * FAR_BEYOND_CALIBRATION) if strict else None
        ranges.append(ContextRange(min_tokens=low, max_tokens=high, calibrated=made, strict=strict))
    return ranges


def shortest_first(profiles: Sequence[Profile], *, strict: bool = False) -> tuple[list[int], list[ContextRange]]:
    """The calibration splits' order by their samples' lengths, shortest first, and the prompt lengths each serves
    in that order (`length_ranges`). One split that does not record its lengths serves every length; several are
    refused, since they cannot be ordered."""
    lengths = [calibrated_lengths(p) for p in profiles]
    order = sorted(range(len(profiles)), key=lambda k: lengths[k] or (0, 0))
    if not all(lengths):
        if len(profiles) > 1:
            raise ConfigError("a profile does not record its samples' context lengths; re-run calibrate to plan by "
                              "length")
        return order, [ContextRange()]
    return order, length_ranges([lengths[k] for k in order], strict=strict)  # type: ignore[misc]


def calibration_splits(calib: DataSpec | None, calib_splits: Sequence[DataSpec] | None, *,
                       default: Sequence[DataSpec], max_samples: int | None = None,
                       column_map: Mapping[str, str] | None = None) -> list[DataSpec]:
    """`run`'s calibration splits: `calib` alone, else `calib_splits`, else `default`; ConfigError when both are given
    or none is, and each split is read once here, so a missing or empty one is refused before any work."""
    if calib is not None and calib_splits is not None:
        raise ConfigError("give the calibration data as calib (one split) or calib_splits (one per range of prompt "
                          "lengths), not both")
    splits = [calib] if calib is not None else list(calib_splits if calib_splits is not None else default)
    if not splits:
        raise ConfigError("calib_splits is empty; give at least one calibration split")
    for split in splits:
        resolve_samples(split, max_samples=max_samples, column_map=column_map)
    return splits


def readable_splits(splits: list[DataSpec], info: ModelInfo, *, defaulted: bool, long_context: int) -> list[DataSpec]:
    """The default splits (`defaulted`) without their last, long one when the model reads fewer than `long_context`
    tokens, saying so; otherwise `splits` as given."""
    if defaulted and info.max_context and info.max_context < long_context and len(splits) > 1:
        logger.info("calibrating on %s only: %s reads %d tokens, fewer than %s needs", splits[0], info.model_id,
                    info.max_context, splits[-1])
        return splits[:1]
    return splits


def split_folders(out: Path, splits: Sequence[DataSpec]) -> list[Path]:
    """Where each calibration split's files go: the first's to `out` (so a one-split run resumes), each other's to
    out/calib-<its file's stem, else split<k>>."""
    return [out] + [out / f"calib-{Path(s).stem if isinstance(s, (str, Path)) else f'split{k + 1}'}"
                    for k, s in enumerate(splits) if k > 0]


def with_context(plan_file: PlanFile, context: ContextRange | None) -> PlanFile:
    """The ladder with every rung serving `context` (None: every length, as before schema 2.1)."""
    return replace(plan_file, plans=tuple(replace(p, context=context) for p in plan_file.plans), schema_version="")


def by_length(ladders: Sequence[PlanFile], ranges: Sequence[ContextRange]) -> PlanFile:
    """One ladder of the buckets' ladders (the same budgets, one bucket each, shortest first): per budget, each
    bucket's rung with its range of prompt lengths. One bucket: its ladder with its range."""
    if len(ladders) != len(ranges) or not ladders:
        raise ConfigError("give one ladder per range of prompt lengths")
    budgets = ladders[0].budgets
    for ladder in ladders[1:]:
        if ladder.budgets != budgets:
            raise ConfigError(f"the ladders of the length buckets have other budgets ({ladder.budgets} against "
                              f"{budgets}); optimize every bucket at the same budgets")
    plans: list[Plan] = [replace(ladder.plan_for(b), context=context)
                         for b in budgets for ladder, context in zip(ladders, ranges)]
    return replace(ladders[0], plans=tuple(plans), schema_version="")


def guard_each_length(lm: LoadedModel, ladders: Sequence[PlanFile], parts: Sequence[LengthRun],
                      splits: Sequence[DataSpec], folders: Sequence[Path], *, policies: Sequence[str],
                      config: OptimizeConfig, policy_sets: Sequence[Sequence[str]], fresh: bool,
                      max_samples: int | None, column_map: Mapping[str, str] | None,
                      max_context_tokens: int | None, progress: Progress | None) -> PlanFile:
    """The guard (optimization/guard.py) of each split's ladder on that split's samples and profile, cross-fitted
    where it can be, against `policies` (a target plan: the engine's own settings), its cache in the split's
    folder; `parts` get what each guard measured. Returns the guarded ladders as one ladder by length."""
    guarded = []
    for part, ladder, split, folder in zip(parts, ladders, splits, folders):
        samples, _ = resolve_samples(split, max_samples=max_samples, column_map=column_map)
        if fresh:
            (folder / "guard.json").unlink(missing_ok=True)
        profile = part.calibration.profile
        obstacle = crossfit_obstacle(profile, config)
        if obstacle:  # e.g. one calibration sample, or a solver that measures on every sample
            logger.info("guard: the %s measured on the calibration samples %s made from (%s)",
                        "plans are" if len(policy_sets) > 1 else "plan is",
                        "they were" if len(policy_sets) > 1 else "it was", obstacle)
        if len(parts) > 1:
            logger.info("guard: prompts of %s", part.context.describe())
        from_profile = ({"profile": profile, "config": config, "policy_sets": policy_sets[1:]}  # an engine target
                        if not obstacle or policy_sets or engine_settings(config.target) else {})  # grades its way
        kept, part.guard, part.guard_samples = guard_plan(lm, ladder, samples, progress=progress,
                                                          policies=engine_settings(config.target) or policies,
                                                          cache=folder / "guard.json", crossfit=not obstacle,
                                                          max_context_tokens=max_context_tokens, **from_profile)
        guarded.append(kept)
    return by_length(guarded, [part.context for part in parts])
