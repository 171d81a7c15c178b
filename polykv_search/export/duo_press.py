"""kvpress's DuoAttentionPress reading its pattern from an exported folder instead of DuoAttention's repository.

    press = DuoAttentionPatternPress(pattern_dir="duo_pattern/")     # head_compression_ratio from config.json
    answer = pipeline(context, question=question, press=press)["answer"]

Only where the pattern comes from changes: kvpress's own code builds the streaming mask (the lowest-scored
`head_compression_ratio` share of KV heads, i.e. exactly the 0 heads of the exported file) and masks their keys.
Run it on the model's own attention (kvpress patches SDPA and eager), not inside `polykv_attention`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from kvpress import DuoAttentionPress

from polykv_search.export.duo_attention import CONFIG_FILE, HEADS_FILE, DuoPattern


@dataclass
class DuoAttentionPatternPress(DuoAttentionPress):
    """DuoAttentionPress with the pattern of `pattern_dir`; head_compression_ratio < 0 (default): the folder's."""

    pattern_dir: str = ""
    head_compression_ratio: float = -1.0

    def __post_init__(self) -> None:
        pattern = DuoPattern.read(self.pattern_dir)  # PlanError for a folder that is not a pattern
        if self.head_compression_ratio < 0:
            self.head_compression_ratio = pattern.head_compression_ratio

    def load_attention_pattern(self, model) -> tuple[int, int, np.ndarray]:
        """(sink_size, recent_size, head scores (L, H_kv) in [0, 1]) from the folder, as kvpress reads the repo's."""
        folder = Path(self.pattern_dir)
        config = json.loads((folder / CONFIG_FILE).read_text())
        scores = np.clip(np.loadtxt(folder / HEADS_FILE, dtype=float, delimiter="\t", ndmin=2), 0, 1)  # (L, H_kv)
        return int(config["sink_size"]), int(config["recent_size"]), scores
