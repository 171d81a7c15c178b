"""Where converted models live: $POLYKV_CACHE, else ~/.cache/polykv-search."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    root = Path(os.environ.get("POLYKV_CACHE") or Path.home() / ".cache" / "polykv-search")
    root.mkdir(parents=True, exist_ok=True)
    return root
