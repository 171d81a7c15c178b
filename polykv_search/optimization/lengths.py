"""Plans by prompt length: at each budget, one rung per range of prompt lengths, each made and guarded on
calibration samples of its own length, and the runtime picks the rung by the prompt's length.

A budget is absolute tokens per KV head: a head given 2,048 tokens keeps the whole of a 2k-token context and a
fraction of a 7k one, so a choice made on short samples does not transfer to long ones (docs/long-context.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

from polykv_search.calibration.profile import Profile
from polykv_search.errors import ConfigError
from polykv_search.plan import Plan, PlanFile
from polykv_search.plan.plan import FAR_BEYOND_CALIBRATION, ContextRange


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
