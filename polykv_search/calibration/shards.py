"""Calibration split across processes or machines: `calibrate --shard K/N` measures sample i of the selection
(after --max-samples, 0-based) when i mod N == K - 1, round robin, so every shard holds a share of every task and
depends on nothing but the selection; `merge-profiles` joins the shards back in the selection's order."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from polykv_search.checkpoints import samples_digest
from polykv_search.errors import ConfigError, DataError

SPLIT = "round-robin"  # sample i -> shard (i mod N) + 1; recorded in the header so a merge can check it
SHARD_KEY = "shard"  # the profile header's shard record (absent in a profile of the whole selection)


@dataclass(frozen=True)
class Shard:
    """Shard `index` (1-based) of `count`."""

    index: int
    count: int

    @classmethod
    def of(cls, value: Shard | tuple[int, int] | str) -> Shard:
        """A shard from a Shard, an (index, count) pair or the text "K/N", checked."""
        if isinstance(value, str):
            match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", value)
            if not match:
                raise ConfigError(f"--shard {value!r} is not K/N; give e.g. --shard 1/4 (the first of four shards)")
            value = (int(match.group(1)), int(match.group(2)))
        if not isinstance(value, Shard):
            try:
                index, count = (int(v) for v in value)
            except (TypeError, ValueError):
                raise ConfigError(f"shard {value!r} is not a pair (K, N) of integers; give e.g. (1, 4)") from None
            value = cls(index=index, count=count)
        if value.count < 1 or not 1 <= value.index <= value.count:
            raise ConfigError(f"--shard {value.index}/{value.count}: K must be 1 to N and N at least 1; give e.g. "
                              f"--shard 1/{max(value.count, 2)}")
        return value

    @property
    def name(self) -> str:
        """The folder a shard writes into under the output folder: shard-K-of-N."""
        return f"shard-{self.index}-of-{self.count}"

    def positions(self, n_samples: int) -> list[int]:
        """The positions in a selection of `n_samples` that this shard measures."""
        return list(range(self.index - 1, n_samples, self.count))

    def select(self, samples: Sequence[Any]) -> list[Any]:
        """This shard's samples of the selection, in its order; refused when there are none."""
        if self.index > len(samples):
            raise DataError(f"--shard {self.index}/{self.count}: the selection has only {len(samples)} samples, so "
                            f"shard {self.index} would be empty; use at most {len(samples)} shards")
        return [samples[i] for i in self.positions(len(samples))]

    def record(self, samples: Sequence[Any], kept: Sequence[int], *, dtype: str, device: str) -> dict[str, Any]:
        """The header's shard record: which shard of which selection, and the selection position of each profile
        row (`kept`: the shard-local indices of the samples that were not skipped)."""
        mine = self.positions(len(samples))
        return {"indices": [self.index], "count": self.count, "split": SPLIT, "selected": len(samples),
                "selection_sha256": samples_digest(samples), "positions": [mine[i] for i in kept],
                "dtype": dtype, "device": device}
