"""Per-sample checkpoints shared by long runs (calibrate, evaluate): a fingerprint of the run's settings
guards `--resume`, so a resumed run never mixes samples computed under other settings."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from polykv_search.errors import ProfileError
from polykv_search.io import write_json_atomic

logger = logging.getLogger(__name__)


def prepare_checkpoints(ckpt_dir: Path, fingerprint: dict[str, Any], *, resume: bool) -> None:
    """Keep `ckpt_dir` when resuming a run with the same fingerprint; otherwise start it afresh."""
    run_file = ckpt_dir / "run.json"
    fingerprint = json.loads(json.dumps(fingerprint))  # compare as stored: tuples become lists
    if resume and run_file.exists():
        previous = json.loads(run_file.read_text())
        if previous != fingerprint:
            changed = sorted(k for k in fingerprint if previous.get(k) != fingerprint[k])
            raise ProfileError(f"--resume: the checkpoints in {ckpt_dir} were made with a different "
                               f"{', '.join(changed)}; re-run with the same options, or start over (calibrate and "
                               "evaluate: without --resume; run: --fresh)")
        return
    if resume:
        logger.info("--resume: no checkpoints in %s, starting from the first sample", ckpt_dir)
    if ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_file, fingerprint)
