"""The generator: deterministic per seed, LongBench schema, and splits that share no text or needle."""

from __future__ import annotations

import json
import platform
import re
from collections import Counter
from pathlib import Path

import pytest

from polykv_search.data import load_samples
from polykv_search.data.generate import SPLIT_FILES, generate, generate_split
from polykv_search.data.sources import (
    SPLITS,
    documents_for,
    partition_of,
    sentence_key,
    split_sentences,
    stdlib_documents,
    topic_documents,
)
from polykv_search.data.tasks import FAMILIES, STATEMENT_LABELS

DATA = Path(__file__).resolve().parents[2] / "calibration_data"
PROSE_TASKS = {"niah_single", "niah_multikey", "variable_tracking", "prose_continuation"}
ROW_KEYS = {"context", "input", "answers", "length", "dataset", "all_classes", "_id"}


@pytest.fixture(scope="module")
def small_splits():  # type: ignore[no-untyped-def]
    return {split: generate_split(split, seed=0, per_family=2) for split in SPLITS}


def test_same_seed_same_samples_other_seed_differs(small_splits):
    again = generate_split("calib", seed=0, per_family=2)
    assert again == small_splits["calib"]
    other = generate_split("calib", seed=1, per_family=2)
    assert [s.context for s in other] != [s.context for s in again]


def test_rows_follow_the_longbench_schema(small_splits):
    for samples in small_splits.values():
        assert Counter(s.task for s in samples) == {task: 2 for task in FAMILIES}
        for sample in samples:
            row = sample.to_row()
            assert set(row) == ROW_KEYS
            assert row["answers"] and all(isinstance(a, str) and a.strip() for a in row["answers"])
            assert row["length"] == len(sample.context.split())
            assert (row["all_classes"] == list(STATEMENT_LABELS)) == (sample.task == "fewshot_classification")
            json.dumps(row)


def test_answers_are_where_the_task_says(small_splits):
    for sample in small_splits["eval"]:
        if sample.task in ("niah_single", "niah_multikey"):
            key = re.search(r"number for (\S+) mentioned", sample.question).group(1)
            assert f"for {key} is: {sample.answers[0]}." in sample.context
        elif sample.task == "variable_tracking":
            first, second = sample.answers
            value = re.search(r"value (\d+)", sample.question).group(1)
            assert f"VAR {first} = {value}." in sample.context and f"VAR {second} = VAR {first}." in sample.context
        elif sample.task == "fewshot_classification":
            assert sample.question.startswith("Code: ") and sample.answers[0] in STATEMENT_LABELS


def test_every_document_belongs_to_exactly_one_split():
    ids = [doc.id for doc in (*topic_documents(), *stdlib_documents())]
    per_split = {split: {doc.id for doc in documents_for(split)} for split in SPLITS}
    assert sum(len(v) for v in per_split.values()) == len(ids) == len(set(ids))
    assert all(partition_of(doc_id) in SPLITS for doc_id in ids)
    assert all(len(v) > 50 for v in per_split.values())


def _chunks(samples, tasks):  # type: ignore[no-untyped-def]
    """Identities of the prose sentences (six words or more) in the contexts of `tasks`."""
    keys = {sentence_key(sentence) for s in samples if s.task in tasks for paragraph in s.context.split("\n\n")
            for sentence in split_sentences(paragraph)}
    return keys - {None}


def _needles(samples):  # type: ignore[no-untyped-def]
    found = set()
    for s in samples:
        if s.task in ("niah_single", "niah_multikey", "variable_tracking"):
            found.update(s.answers)
            found.update(re.findall(r"number for (\S+) mentioned", s.question))
    return found


def _assert_disjoint(a, b):  # type: ignore[no-untyped-def]
    assert not _chunks(a, PROSE_TASKS) & _chunks(b, PROSE_TASKS)
    lines_a = {s.question.removeprefix("Code: ").removesuffix("\nKind:") for s in a
               if s.task == "fewshot_classification"}
    lines_a |= {line.removeprefix("Code: ") for s in a if s.task == "fewshot_classification"
                for line in s.context.split("\n") if line.startswith("Code: ")}
    lines_b = {line.removeprefix("Code: ") for s in b if s.task == "fewshot_classification"
               for line in (s.context + "\n" + s.question).split("\n") if line.startswith("Code: ")}
    assert not lines_a & lines_b
    code_a = {s.context[:300] for s in a if s.task == "code_completion"}
    code_b = {s.context[:300] for s in b if s.task == "code_completion"}
    assert not code_a & code_b
    text_b = "\n".join(s.context + s.question for s in b)
    assert not [needle for needle in _needles(a) if needle in text_b]


def test_generated_splits_share_no_passage_or_needle(small_splits):
    _assert_disjoint(small_splits["calib"], small_splits["eval"])
    _assert_disjoint(small_splits["eval"], small_splits["calib"])
    _assert_disjoint(small_splits["calib"], small_splits["eval_alt"])
    _assert_disjoint(small_splits["eval"], small_splits["eval_alt"])


@pytest.fixture(scope="module")
def committed():  # type: ignore[no-untyped-def]
    return {split: load_samples(DATA / name) for split, name in SPLIT_FILES.items()}


def test_committed_files_load_and_cover_every_family(committed):
    assert len(committed["calib"]) == 24 and len(committed["eval"]) >= 60 and len(committed["eval_alt"]) >= 60
    for samples in committed.values():
        assert set(Counter(s.task for s in samples)) == set(FAMILIES)
    _assert_disjoint(committed["calib"], committed["eval"])
    _assert_disjoint(committed["calib"], committed["eval_alt"])
    _assert_disjoint(committed["eval"], committed["eval_alt"])


def test_committed_files_are_the_generator_output(tmp_path):
    manifest = json.loads((DATA / "manifest.json").read_text())
    if manifest["python"] != platform.python_version():
        pytest.skip(f"data was generated on Python {manifest['python']}; the stdlib text differs on this one")
    generate(tmp_path, seed=manifest["seed"])
    for name in SPLIT_FILES.values():
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name


def test_a_larger_calibration_split_stays_apart_from_the_committed_eval_sets(committed):
    """`--calib-per-task 10` (60 calibration samples, to choose plans on more than four a family) draws from the
    calibration documents only: nothing of it is in eval or eval_alt."""
    larger = generate_split("calib", seed=0, per_family=10)
    assert Counter(s.task for s in larger) == dict.fromkeys(FAMILIES, 10)
    for held_out in (committed["eval"], committed["eval_alt"]):
        _assert_disjoint(larger, held_out)
        _assert_disjoint(held_out, larger)
