"""Join profiles: of the same samples on disjoint budget grids (a finer or wider grid without re-measuring the
levels already in a profile), or of disjoint shards of one sample selection (`calibrate --shard K/N`).

Budget grids: every per-budget array entry (mass_lost, out_err, layer_kl, layer_nll, around_kl, head_kl,
head_fisher) is measured for each budget on its own from the same prefill (head_fisher's answer draws are seeded by
the sample), so profiles of the same model, samples, policies and options, on disjoint grids, join into exactly the
profile one calibrate run on the union grid would have written.
Shards: each sample's numbers come from its own prefill, so the shards' arrays, joined along the sample axis in the
selection's order, are bit for bit those of one run over the whole selection. Every array is taken to hold the
samples on its first axis, so a new cost kind merges without a change here.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from polykv_search.calibration.profile import (
    AROUND_BASE,
    AROUND_KL,
    COST_KINDS,
    HEAD_COST_KINDS,
    HEAD_FISHER,
    HEAD_FISHER_PROBED,
    OPTIONAL_COST_KINDS,
    Profile,
)
from polykv_search.calibration.shards import SHARD_KEY, SPLIT
from polykv_search.checkpoints import changed_keys
from polykv_search.errors import ProfileError

_SAME = ("model", "policies", "samples", "signals", "data", SHARD_KEY)  # header fields that must agree exactly
# header fields a shard may hold its own value of: when and with what it ran, its samples and shard record, and its
# data sources (paths differ between machines; the selection digest already pins the samples)
_PROVENANCE = ("created", "versions", "merged_from", "samples", "data", SHARD_KEY)


def merge_profiles(profiles: Sequence[Profile | str | Path], *, allow_partial: bool = False) -> Profile:
    """Join profiles (or profile files): shards of one selection along the samples (`merge_shards`), profiles of
    the same samples along the budget grid (`merge_budget_grids`); refuses, naming why, when neither applies."""
    loaded = [p if isinstance(p, Profile) else Profile.load(p) for p in profiles]
    if not loaded:
        raise ProfileError("give the profiles to merge")
    first = loaded[0]
    same_samples = all(p.header["samples"] == first.header["samples"]
                       and p.header.get(SHARD_KEY) == first.header.get(SHARD_KEY) for p in loaded)
    shards = [SHARD_KEY in p.header for p in loaded]
    levels = [b for p in loaded for b in p.budgets]
    if len(loaded) > 1 and same_samples and (len(set(levels)) == len(levels) or not all(shards)):
        return merge_budget_grids(loaded)  # (copies of one shard on one grid overlap: merge_shards says so)
    if all(shards):
        return merge_shards(loaded, allow_partial=allow_partial)
    if any(shards):
        index = shards.index(not shards[0]) + 1
        raise ProfileError(f"profile {index} is {'a' if shards[index - 1] else 'not a'} shard (`calibrate --shard "
                           f"K/N`) and profile 1 is {'a' if shards[0] else 'not a'} shard; merge the shards of one "
                           "split, or profiles of the same samples on disjoint budget grids")
    if len(loaded) < 2:
        raise ProfileError("give at least two profiles to merge")
    raise ProfileError("the profiles hold other samples and none is a shard: a budget-grid merge needs profiles of "
                       "the same samples, a sample merge the shards of one selection (`calibrate --shard K/N`)")


def merge_shards(profiles: Sequence[Profile], *, allow_partial: bool = False) -> Profile:
    """One profile of the shards' samples, in the selection's order: with every shard of the split, the profile one
    calibrate run over the whole selection writes (its shard record gone); `allow_partial` merges the shards given
    (the result is again a shard record of those, to merge with the rest later)."""
    first = profiles[0]
    records = [p.header[SHARD_KEY] for p in profiles]
    count = int(records[0]["count"])
    for index, (profile, record) in enumerate(zip(profiles, records), start=1):
        _check_shard(profile, record, index, first, records[0])
    seen: dict[int, int] = {}
    for index, record in enumerate(records, start=1):
        for k in record["indices"]:
            if k in seen:
                raise ProfileError(f"shard {k} of {count} is in profile {seen[k]} and profile {index}: their samples "
                                   "overlap; give each shard once")
            seen[k] = index
    missing = [k for k in range(1, count + 1) if k not in seen]
    if missing and not allow_partial:
        which = f"shard {missing[0]} of {count} is" if len(missing) == 1 else \
            f"shards {', '.join(map(str, missing))} of {count} are"
        raise ProfileError(f"{which} missing; calibrate with --shard {missing[0]}/{count} and add its profile, or "
                           "pass --allow-partial to merge only the shards given")
    positions = [int(i) for record in records for i in record["positions"]]
    if len(set(positions)) != len(positions):
        raise ProfileError("the shards hold samples at the same selection positions; their shard records are "
                           "damaged or edited, re-run calibrate --shard")
    order = torch.tensor(sorted(range(len(positions)), key=positions.__getitem__), dtype=torch.long)
    arrays = {name: _joined(name, [p.arrays[name] for p in profiles], profiles, order) for name in first.arrays}
    header = {k: v for k, v in first.header.items() if k not in (SHARD_KEY, "merged_from")}
    rows = [row for p in profiles for row in p.header["samples"]]
    header["samples"] = [rows[i] for i in order.tolist()]
    header["created"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    header["merged_from"] = [entry for p, record in zip(profiles, records) for entry in _provenance(p, record)]
    if missing:
        header[SHARD_KEY] = {**records[0], "indices": sorted(seen), "positions": sorted(positions)}
    merged = Profile(header=header, arrays=arrays)
    merged.check()
    return merged


def _check_shard(profile: Profile, record: dict[str, Any], index: int, first: Profile,
                 first_record: dict[str, Any]) -> None:
    """ProfileError, naming what differs, unless `profile` is a shard of the split and settings of `first`."""
    if int(record["count"]) != int(first_record["count"]):
        raise ProfileError(f"profile {index} is a shard of {record['count']} and profile 1 of "
                           f"{first_record['count']}; merge the shards of one --shard K/N split")
    if record.get("split") != SPLIT or record.get("split") != first_record.get("split"):
        raise ProfileError(f"profile {index} splits its samples {record.get('split')!r}, this polykv-search merges "
                           f"{SPLIT!r} shards; re-run calibrate --shard with this version")
    if (record["selected"], record["selection_sha256"]) != (first_record["selected"],
                                                           first_record["selection_sha256"]):
        raise ProfileError(f"profile {index} is a shard of another sample selection than profile 1 (other --data, "
                           "--max-samples or data order); calibrate every shard on the same selection")
    if record.get("dtype") != first_record.get("dtype"):
        raise ProfileError(f"profile {index} was calibrated in {record.get('dtype')} and profile 1 in "
                           f"{first_record.get('dtype')}; calibrate every shard with the same --dtype")
    if len(record["positions"]) != profile.num_samples:
        raise ProfileError(f"profile {index}: its shard record lists {len(record['positions'])} samples but it "
                           f"holds {profile.num_samples}; the file is damaged or edited, re-run calibrate --shard")
    for key in sorted((set(profile.header) | set(first.header)) - set(_PROVENANCE)):
        mine, theirs = profile.header.get(key), first.header.get(key)
        if mine != theirs:
            what = ", ".join(f"{key}.{k}" for k in changed_keys(theirs, mine)) \
                if isinstance(mine, dict) and isinstance(theirs, dict) else key
            raise ProfileError(f"profile {index} differs from profile 1 in {what}; merge shards calibrated with the "
                               "same model, policies, budgets and options")
    if set(profile.arrays) != set(first.arrays):
        odd = sorted(set(profile.arrays) ^ set(first.arrays))
        raise ProfileError(f"profile {index} and profile 1 differ in their arrays ({', '.join(odd)}); merge shards "
                           "calibrated with the same options")


def _joined(name: str, parts: list[torch.Tensor], profiles: Sequence[Profile], order: torch.Tensor) -> torch.Tensor:
    """The shards' `name` arrays joined along the samples (first axis), in selection order."""
    if all(t.dim() > 0 and t.shape[0] == p.num_samples for t, p in zip(parts, profiles)):
        return torch.cat(parts, dim=0).index_select(0, order)  # (N, ...)
    if all(t.shape == parts[0].shape and torch.equal(t, parts[0]) for t in parts):
        return parts[0].clone()  # not per sample and the same in every shard
    raise ProfileError(f"profile array {name} has no sample axis and differs between the shards; this "
                       "polykv-search cannot merge it")


def _provenance(profile: Profile, record: dict[str, Any]) -> list[dict[str, Any]]:
    """What each shard ran with: kept in the merged header (a merged partial profile passes its own on)."""
    if profile.header.get("merged_from"):
        return list(profile.header["merged_from"])
    return [{"shard": f"{record['indices'][0]}/{record['count']}", "samples": profile.num_samples,
             "created": profile.header.get("created"), "versions": profile.header.get("versions"),
             "dtype": record.get("dtype"), "device": record.get("device")}]


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
    kinds = [*COST_KINDS,
             *(k for k in (*OPTIONAL_COST_KINDS, *HEAD_COST_KINDS) if all(k in p.arrays for p in profiles))]
    if all(AROUND_KL in p.arrays for p in profiles):
        if any(_backgrounds(p) != _backgrounds(first) for p in profiles):
            raise ProfileError("the profiles were probed around other --around backgrounds; calibrate them with "
                               "the same --around budgets and --around-policy")
        kinds.append(AROUND_KL)  # its background KL (around_base_kl) does not depend on the grid
    order = torch.tensor(sorted(range(len(budgets)), key=budgets.__getitem__))
    per_level = (*COST_KINDS, *OPTIONAL_COST_KINDS, AROUND_KL, *HEAD_COST_KINDS, HEAD_FISHER_PROBED)
    arrays = {k: v.clone() for k, v in first.arrays.items() if k not in per_level}
    if AROUND_KL not in kinds:
        arrays.pop(AROUND_BASE, None)
    probed_mask = [HEAD_FISHER_PROBED] if HEAD_FISHER in kinds and all(HEAD_FISHER_PROBED in p.arrays
                                                                        for p in profiles) else []
    for kind in [*kinds, *probed_mask]:
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
