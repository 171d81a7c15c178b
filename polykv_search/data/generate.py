"""Generate the calibration and evaluation task files from text every CPython install carries.

Usage: python -m polykv_search.data.generate --seed 0 --out calibration_data
Writes calib.jsonl, eval.jsonl, eval_alt.jsonl, long.jsonl, calib_long.jsonl (LongBench row schema) and
manifest.json.
    python -m polykv_search.data.generate --only-long --long-tokens 8000,32000 --tokenizer gemma3-270m --out DIR
writes only the long splits (long.jsonl and calib_long.jsonl), measured in another model's tokens.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import random
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from polykv_search.data.sample import Sample
from polykv_search.data.sources import CALIB_LONG, LONG, Split, documents_for
from polykv_search.data.tasks import CHARS_PER_TOKEN, FAMILIES, Builder, SplitPool, make_pool
from polykv_search.errors import ConfigError, DataError, PolykvError
from polykv_search.io import write_atomic, write_json_atomic

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
# Samples per family in each split: calib 6 x 4 = 24, eval and eval_alt 6 x 10 = 60.
DEFAULT_PER_FAMILY: dict[Split, int] = {"calib": 4, "eval": 10, "eval_alt": 10}
SPLIT_FILES: dict[Split, str] = {"calib": "calib.jsonl", "eval": "eval.jsonl", "eval_alt": "eval_alt.jsonl"}
# The long split: 2 samples a family (issue #19: an evaluation of long prompts on CPU), 6k-8k tokens (SmolLM2 reads
# 8,192, question and answer included), measured with the tokenizer of the model it is for.
LONG_FILE = "long.jsonl"
LONG_PER_FAMILY = 2
LONG_TOKENS = (6000, 8000)
LONG_TOKENIZER = "smollm2-135m"
# The long calibration split (issue #37: plans made and guarded at the lengths they serve): samples from
# the test-suite text that long.jsonl does not use, at the same lengths (8 a family: 48 samples; docs/data.md).
CALIB_LONG_FILE = "calib_long.jsonl"
CALIB_LONG_PER_FAMILY = 8
LONG_SOURCES = ("CPython standard library test suites (test/, */tests/, idlelib/idle_test/): source files, "
                "docstrings and comments (PSF License)")
# A measured long context is within this share of its target: a few rebuilds with the character target rescaled
# by the measured ratio get there (characters per token vary 3.0-4.6 between samples).
FIT_TOLERANCE = 0.03
_FIT_ROUNDS = 6
CALIB_LONG_SOURCES = ("CPython standard library test suites: the source files, docstrings and comments that "
                      "long.jsonl does not use (PSF License)")
_FIT_KWARGS: dict[str, dict[str, float]] = {"code_completion": {"slack": 0.02}}  # the code prefix ends near target
TokenCounter = Callable[[str], int]


def generate_split(split: Split, *, seed: int, per_family: int, min_tokens: int = 1100,
                   max_tokens: int = 3500, families: Sequence[str] | None = None,
                   count_tokens: TokenCounter | None = None, pool: SplitPool | None = None) -> list[Sample]:
    """Build `per_family` samples of every family for `split`, deterministically for (`seed`, `split`).

    Target context sizes are spread evenly over [min_tokens, max_tokens] and shuffled, so every family covers
    the whole length range. They are SmolLM2 tokens estimated from characters, or, with `count_tokens`, tokens
    measured by it: each context is then within FIT_TOLERANCE of its target. `pool`: the text to take (default:
    the split's own documents, shuffled); it is consumed as samples are built.
    """
    if not 0 < min_tokens <= max_tokens:
        raise ConfigError(f"token range {min_tokens}..{max_tokens} is empty; give 0 < --min-tokens <= --max-tokens")
    names = list(families or FAMILIES)
    unknown = [name for name in names if name not in FAMILIES]
    if unknown:
        raise ConfigError(f"unknown task family {unknown[0]!r}; choose from {', '.join(FAMILIES)}")
    if pool is None:
        pool = make_pool(split, documents_for(split), random.Random(f"polykv-search:{seed}:{split}:pool"))
    samples: list[Sample] = []
    for name in names:
        builder, kind = FAMILIES[name]
        rng = random.Random(f"polykv-search:{seed}:{split}:{name}")
        targets = [min_tokens + (max_tokens - min_tokens) * (i + 0.5) / per_family for i in range(per_family)]
        rng.shuffle(targets)
        for index, tokens in enumerate(targets):
            if count_tokens is None:
                samples.append(builder(pool, rng, chars=int(tokens * CHARS_PER_TOKEN[kind]), index=index))
            else:
                samples.append(_fitted(builder, pool, rng, tokens=tokens, chars=tokens * CHARS_PER_TOKEN[kind],
                                       index=index, count_tokens=count_tokens, **_FIT_KWARGS.get(name, {})))
    return samples


def _fitted(builder: Builder, pool: SplitPool, rng: random.Random, *, tokens: float, chars: float, index: int,
            count_tokens: TokenCounter, **kwargs: float) -> Sample:
    """The sample `builder` makes whose context measures closest to `tokens`: build, measure, rescale the
    character target by the measured ratio and build again from the same pool position and random state."""
    start = (rng.getstate(), pool.cursor, set(pool.used_files))
    best: tuple[int, Sample, tuple[object, int, set[str]]] | None = None
    for _ in range(_FIT_ROUNDS):
        rng.setstate(start[0])
        pool.cursor, pool.used_files = start[1], set(start[2])
        sample = builder(pool, rng, chars=int(chars), index=index, **kwargs)
        measured = count_tokens(sample.context)
        if best is None or abs(measured - tokens) < abs(best[0] - tokens):
            best = (measured, sample, (rng.getstate(), pool.cursor, set(pool.used_files)))
        if abs(measured - tokens) <= FIT_TOLERANCE * tokens:
            break
        chars *= tokens / max(measured, 1)
    assert best is not None  # _FIT_ROUNDS >= 1
    measured, sample, (state, cursor, used) = best
    rng.setstate(state)  # type: ignore[arg-type]
    pool.cursor, pool.used_files = cursor, used
    if abs(measured - tokens) > FIT_TOLERANCE * tokens:
        logger.warning("sample %s: context of %d tokens for a target of %.0f", sample.id, measured, tokens)
    return sample


def write_jsonl(path: Path, samples: Sequence[Sample]) -> Path:
    """Write samples as LongBench JSON lines, atomically."""
    text = "".join(json.dumps(s.to_row(), ensure_ascii=False) + "\n" for s in samples)
    return write_atomic(path, text)


def generate(out: str | Path, *, seed: int = 0, per_family: dict[Split, int] | None = None,
             min_tokens: int = 1100, max_tokens: int = 3500) -> dict[Split, Path]:
    """Write calib, eval and eval_alt under `out` plus a manifest recording the seed, sources and file hashes
    (a long split's entry already in the manifest is kept: `generate_long` writes that split)."""
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
        manifest["splits"][split] = _split_entry(split, path, samples)  # type: ignore[index]
        logger.info("wrote %s: %d samples", path, len(samples))
    for split in (LONG, CALIB_LONG):  # written by generate_long, kept as they are
        kept = _read_manifest(out).get("splits", {}).get(split)
        if kept is not None:
            manifest["splits"][split] = kept  # type: ignore[index]
    write_json_atomic(out / "manifest.json", manifest)
    return written


def generate_long(out: str | Path, *, seed: int = 0, per_family: int = LONG_PER_FAMILY,
                  tokens: tuple[int, int] = LONG_TOKENS, tokenizer: str = LONG_TOKENIZER,
                  calib_per_family: int = CALIB_LONG_PER_FAMILY) -> Path:
    """Write the long split (`long.jsonl`) under `out` and, from the test-suite text it leaves unused, the long
    calibration split (`calib_long.jsonl`, `calib_per_family` samples a family; 0: none), with their manifest
    entries (other entries are kept): contexts of `tokens` = (min, max) tokens of model `tokenizer`, measured."""
    # imported here: measuring needs transformers (and torch), which the other splits do not
    from polykv_search.models import load_tokenizer

    loaded = load_tokenizer(tokenizer)
    if loaded.max_context and tokens[1] > loaded.max_context:
        raise ConfigError(f"--long-tokens up to {tokens[1]} exceeds the {loaded.max_context}-token context of "
                          f"{tokenizer}; lower it or give --tokenizer of a model with a longer context")

    def count(text: str) -> int:
        return len(loaded.tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])

    pool = make_pool(LONG, documents_for(LONG), random.Random(f"polykv-search:{seed}:{LONG}:pool"))
    samples = generate_split(LONG, seed=seed, per_family=per_family, min_tokens=tokens[0], max_tokens=tokens[1],
                             count_tokens=count, pool=pool)
    written = [(LONG, write_jsonl(Path(out) / LONG_FILE, samples), samples)]
    if calib_per_family > 0:
        rest = calib_long_pool(pool, samples)
        calib = generate_split(CALIB_LONG, seed=seed, per_family=calib_per_family, min_tokens=tokens[0],
                               max_tokens=tokens[1], count_tokens=count, pool=rest)
        written.append((CALIB_LONG, write_jsonl(Path(out) / CALIB_LONG_FILE, calib), calib))
    manifest = _read_manifest(Path(out)) or {"generator": "polykv_search.data.generate",
                                             "generator_version": GENERATOR_VERSION}
    for split, path, split_samples in written:
        manifest.setdefault("splits", {})[split] = {
            **_split_entry(split, path, split_samples), "seed": seed, "python": platform.python_version(),
            "token_range": list(tokens), "tokenizer": {"model": loaded.model_id, "revision": loaded.revision},
            "sources": LONG_SOURCES if split == LONG else CALIB_LONG_SOURCES}
        logger.info("wrote %s: %d samples of %d-%d %s tokens", path, len(split_samples), *tokens, loaded.model_id)
    write_json_atomic(Path(out) / "manifest.json", manifest)
    return written[0][1]


def calib_long_pool(pool: SplitPool, long_samples: Sequence[Sample]) -> SplitPool:
    """The long split's pool after `long_samples` were built from it, as the long calibration split's: only the
    prose paragraphs, code files and classification lines those samples did not use (the prose may repeat
    between calibration samples, never reach long.jsonl's)."""
    if pool.cursor >= len(pool.paragraphs):
        raise DataError("the long split used all of the test suite's prose; no text is left for calib_long.jsonl: "
                        "lower --long-per-task or --long-tokens")
    used_text = "\n".join(f"{s.context}\n{s.question}" for s in long_samples)
    used_lines = {line.strip() for line in used_text.splitlines()}
    lines = {label: [x for x in kept if x not in used_lines and f"Code: {x}" not in used_lines]
             for label, kept in pool.lines_by_label.items()}
    return SplitPool(split=CALIB_LONG, paragraphs=pool.paragraphs[pool.cursor:], code_docs=pool.code_docs,
                     lines_by_label=lines, used_files=set(pool.used_files))


def _split_entry(split: Split, path: Path, samples: Sequence[Sample]) -> dict[str, object]:
    return {
        "file": path.name,
        "samples": len(samples),
        "per_task": dict(Counter(s.task for s in samples)),
        "source_documents": len(documents_for(split)),
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
    }


def _read_manifest(out: Path) -> dict[str, Any]:
    path = out / "manifest.json"
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path} ({exc}); delete it to write a new one") from exc


def parse_token_range(text: str) -> tuple[int, int]:
    """"6000,8000" -> (6000, 8000); ConfigError naming the value otherwise."""
    try:
        low, high = (int(part) for part in text.split(","))
    except ValueError:
        raise ConfigError(f"token range {text!r} is not MIN,MAX (e.g. 6000,8000)") from None
    if not 0 < low <= high:
        raise ConfigError(f"token range {text!r} is empty; give 0 < MIN <= MAX")
    return low, high


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m polykv_search.data.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("calibration_data"))
    parser.add_argument("--min-tokens", type=int, default=1100, help="smallest target context (SmolLM2 tokens)")
    parser.add_argument("--max-tokens", type=int, default=3500, help="largest target context (SmolLM2 tokens)")
    for split, count in DEFAULT_PER_FAMILY.items():
        parser.add_argument(f"--{split.replace('_', '-')}-per-task", type=int, default=count, dest=f"n_{split}",
                            help=f"samples per task family in {SPLIT_FILES[split]}")
    parser.add_argument("--long-per-task", type=int, default=LONG_PER_FAMILY,
                        help=f"samples per task family in {LONG_FILE} (0: no long split)")
    parser.add_argument("--long-tokens", default=",".join(map(str, LONG_TOKENS)),
                        help="MIN,MAX context tokens of the long split, measured with --tokenizer")
    parser.add_argument("--tokenizer", default=LONG_TOKENIZER,
                        help="model whose tokenizer measures the long split (alias, .gguf, folder or hub id)")
    parser.add_argument("--calib-long-per-task", type=int, default=CALIB_LONG_PER_FAMILY,
                        help=f"samples per task family in {CALIB_LONG_FILE}, from the text {LONG_FILE} leaves (0: none)")
    parser.add_argument("--only-long", action="store_true",
                        help=f"write only {LONG_FILE} and {CALIB_LONG_FILE} (and their manifest entries)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        long_tokens = parse_token_range(args.long_tokens)
        if args.only_long and args.long_per_task < 1:
            raise ConfigError("--only-long needs --long-per-task of 1 or more")
        if not args.only_long:
            generate(args.out, seed=args.seed, min_tokens=args.min_tokens, max_tokens=args.max_tokens,
                     per_family={split: getattr(args, f"n_{split}") for split in DEFAULT_PER_FAMILY})
        if args.long_per_task > 0:
            generate_long(args.out, seed=args.seed, per_family=args.long_per_task, tokens=long_tokens,
                          tokenizer=args.tokenizer, calib_per_family=args.calib_long_per_task)
    except PolykvError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
