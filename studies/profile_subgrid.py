"""Write a profile restricted to some levels of its budget grid: what calibrating on that smaller grid would have
measured (each probe is independent of the other levels), without calibrating again.

Usage:
    python studies/profile_subgrid.py outputs/perhead/smollm2/profile.safetensors --keep 16,256,2048 \
        --out outputs/perhead/grid_16_256_2048.safetensors

Then `optimize --profile <out> --cost head_kl` and `choose --metric task` against the full grid's plan say, on
calibration samples, whether the cheaper grid (fewer probes per sample) loses anything.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from polykv_search.calibration import Profile


def subgrid(profile: Profile, keep: list[int]) -> Profile:
    """The profile at the budget levels `keep` (each one of its grid), every per-level array sliced alike."""
    grid = profile.budgets
    missing = [b for b in keep if b not in grid]
    if missing:
        raise SystemExit(f"--keep {','.join(map(str, missing))}: not in the profile's grid {grid}")
    index = [grid.index(b) for b in sorted(keep)]
    per_level = [k for k in profile.cost_kinds if k in profile.arrays]  # costs end in the grid dimension
    arrays = {k: (v[..., index].clone() if k in per_level else v) for k, v in profile.arrays.items()}
    header = copy.deepcopy(profile.header)
    header["budgets"] = sorted(keep)
    restricted = Profile(header=header, arrays=arrays)
    restricted.check()
    return restricted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("profile", type=Path)
    parser.add_argument("--keep", required=True, help="Budget levels to keep, e.g. 16,256,2048")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    keep = [int(b) for b in args.keep.split(",")]
    path = subgrid(Profile.load(args.profile), keep).save(args.out)
    print(f"{path}: grid {sorted(keep)}")


if __name__ == "__main__":
    main()
