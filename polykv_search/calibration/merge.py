"""Join profiles measured on other budget grids: a finer or wider grid without re-measuring the levels already
in a profile.

Every per-budget array entry (mass_lost, out_err, layer_kl, layer_nll, around_kl, head_kl) is measured for each budget on
its own from the same prefill, so profiles of the same model, samples, policies and options, on disjoint grids, join
into exactly the profile one calibrate run on the union grid would have written.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from polykv_search.calibration.profile import (
    AROUND_BASE,
    AROUND_KL,
    COST_KINDS,
    HEAD_KL,
    OPTIONAL_COST_KINDS,
    Profile,
)
from polykv_search.errors import ProfileError

_SAME = ("model", "policies", "samples", "signals", "data")  # header fields that must agree exactly


def merge_budget_grids(profiles: Sequence[Profile]) -> Profile:
    """One profile on the union of the grids, levels increasing; raises ProfileError naming what differs."""
    if len(profiles) < 2:
        raise ProfileError("give at least two profiles to merge")
    first = profiles[0]
    options = {k: v for k, v in first.header["options"].items() if k != "cost_kinds"}
    for index, other in enumerate(profiles[1:], start=2):
        for key in _SAME:
            if other.header.get(key) != first.header.get(key):
                raise ProfileError(f"profile {index} differs from profile 1 in {key!r}; only profiles of the same "
                                   "model, samples, policies and data can be merged")
        other_options = {k: v for k, v in other.header["options"].items() if k != "cost_kinds"}
        if other_options != options:
            raise ProfileError(f"profile {index} was calibrated with other options ({other_options}) than profile "
                               f"1 ({options}); re-run calibrate with the same --window and --max-context")
    budgets = [b for p in profiles for b in p.budgets]
    repeated = sorted({b for b in budgets if budgets.count(b) > 1})
    if repeated:
        raise ProfileError(f"budget level(s) {repeated} are in more than one profile; merge disjoint grids")
    kinds = [*COST_KINDS, *(k for k in (*OPTIONAL_COST_KINDS, HEAD_KL) if all(k in p.arrays for p in profiles))]
    if all(AROUND_KL in p.arrays for p in profiles):
        if any(_backgrounds(p) != _backgrounds(first) for p in profiles):
            raise ProfileError("the profiles were probed around other --around backgrounds; calibrate them with "
                               "the same --around budgets and --around-policy")
        kinds.append(AROUND_KL)  # its background KL (around_base_kl) does not depend on the grid
    order = torch.tensor(sorted(range(len(budgets)), key=budgets.__getitem__))
    per_level = (*COST_KINDS, *OPTIONAL_COST_KINDS, AROUND_KL, HEAD_KL)
    arrays = {k: v.clone() for k, v in first.arrays.items() if k not in per_level}
    if AROUND_KL not in kinds:
        arrays.pop(AROUND_BASE, None)
    for kind in kinds:
        arrays[kind] = torch.cat([p.arrays[kind] for p in profiles], dim=-1).index_select(-1, order)
    header = dict(first.header)
    header["budgets"] = sorted(budgets)
    if AROUND_KL not in kinds:
        header.pop("around", None)  # a background without its probes
    header["options"] = {**first.header["options"], "cost_kinds": kinds}
    header["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    header["merged_from"] = [{"budgets": p.budgets, "created": p.header.get("created")} for p in profiles]
    merged = Profile(header=header, arrays=arrays)
    merged.check()
    return merged


def _backgrounds(profile: Profile) -> list[tuple]:
    """What the around probes were measured against: each background's budget, name and layers."""
    return [(b["budget"], b["name"], b["plan"]["layers"]) for b in profile.around_backgrounds()]
