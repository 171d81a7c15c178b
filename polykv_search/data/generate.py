"""Generate the calibration and evaluation task files from text every CPython install carries.

Usage: python -m polykv_search.data.generate --seed 0 --out calibration_data
Writes calib.jsonl, eval.jsonl, eval_alt.jsonl (LongBench row schema) and manifest.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from polykv_search.data.sample import Sample
from polykv_search.data.sources import Split, documents_for
from polykv_search.data.tasks import CHARS_PER_TOKEN, FAMILIES, make_pool
from polykv_search.errors import ConfigError
from polykv_search.io import write_atomic, write_json_atomic

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
# Samples per family in each split: calib 6 x 4 = 24, eval and eval_alt 6 x 10 = 60.
DEFAULT_PER_FAMILY: dict[Split, int] = {"calib": 4, "eval": 10, "eval_alt": 10}
SPLIT_FILES: dict[Split, str] = {"calib": "calib.jsonl", "eval": "eval.jsonl", "eval_alt": "eval_alt.jsonl"}


def generate_split(split: Split, *, seed: int, per_family: int, min_tokens: int = 1100,
                   max_tokens: int = 3500, families: Sequence[str] | None = None) -> list[Sample]:
    """Build `per_family` samples of every family for `split`, deterministically for (`seed`, `split`).

    Target context sizes are spread evenly over [min_tokens, max_tokens] (SmolLM2 tokens, estimated from
    characters) and shuffled, so every family covers the whole length range.
    """
    if not 0 < min_tokens <= max_tokens:
        raise ConfigError(f"token range {min_tokens}..{max_tokens} is empty; give 0 < --min-tokens <= --max-tokens")
    names = list(families or FAMILIES)
    unknown = [name for name in names if name not in FAMILIES]
    if unknown:
        raise ConfigError(f"unknown task family {unknown[0]!r}; choose from {', '.join(FAMILIES)}")
    pool = make_pool(split, documents_for(split), random.Random(f"polykv-search:{seed}:{split}:pool"))
    samples: list[Sample] = []
    for name in names:
        builder, kind = FAMILIES[name]
        rng = random.Random(f"polykv-search:{seed}:{split}:{name}")
        targets = [min_tokens + (max_tokens - min_tokens) * (i + 0.5) / per_family for i in range(per_family)]
        rng.shuffle(targets)
        for index, tokens in enumerate(targets):
            samples.append(builder(pool, rng, chars=int(tokens * CHARS_PER_TOKEN[kind]), index=index))
    return samples


def write_jsonl(path: Path, samples: Sequence[Sample]) -> Path:
    """Write samples as LongBench JSON lines, atomically."""
    text = "".join(json.dumps(s.to_row(), ensure_ascii=False) + "\n" for s in samples)
    return write_atomic(path, text)


def generate(out: str | Path, *, seed: int = 0, per_family: dict[Split, int] | None = None,
             min_tokens: int = 1100, max_tokens: int = 3500) -> dict[Split, Path]:
    """Write every split under `out` plus a manifest recording the seed, sources and file hashes."""
    out = Path(out)
    counts = {**DEFAULT_PER_FAMILY, **(per_family or {})}
    written: dict[Split, Path] = {}
    manifest: dict[str, object] = {
        "generator": "polykv_search.data.generate",
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "python": platform.python_version(),
        "token_range": [min_tokens, max_tokens],
        "sources": "CPython standard library source files and pydoc_data/topics.py (PSF License)",
        "splits": {},
    }
    for split, filename in SPLIT_FILES.items():
        samples = generate_split(split, seed=seed, per_family=counts[split], min_tokens=min_tokens,
                                 max_tokens=max_tokens)
        path = write_jsonl(out / filename, samples)
        written[split] = path
        documents = documents_for(split)
        manifest["splits"][split] = {  # type: ignore[index]
            "file": filename,
            "samples": len(samples),
            "per_task": dict(Counter(s.task for s in samples)),
            "source_documents": len(documents),
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }
        logger.info("wrote %s: %d samples", path, len(samples))
    write_json_atomic(out / "manifest.json", manifest)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m polykv_search.data.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("calibration_data"))
    parser.add_argument("--min-tokens", type=int, default=1100, help="smallest target context (SmolLM2 tokens)")
    parser.add_argument("--max-tokens", type=int, default=3500, help="largest target context (SmolLM2 tokens)")
    for split, count in DEFAULT_PER_FAMILY.items():
        parser.add_argument(f"--{split.replace('_', '-')}-per-task", type=int, default=count, dest=f"n_{split}",
                            help=f"samples per task family in {SPLIT_FILES[split]}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    generate(args.out, seed=args.seed, min_tokens=args.min_tokens, max_tokens=args.max_tokens,
             per_family={split: getattr(args, f"n_{split}") for split in DEFAULT_PER_FAMILY})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
