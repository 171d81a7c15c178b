"""load_samples: LongBench rows load unchanged, other schemas via a column map, bad input fails in one line."""

from __future__ import annotations

import json

import pytest

from polykv_search.data import Sample, load_samples
from polykv_search.errors import ConfigError, DataError


def test_longbench_rows_load_unchanged(write_rows, make_row):
    rows = [make_row(0), make_row(1, dataset="trec", all_classes=["a", "b"], answers=["a"])]
    samples = load_samples(write_rows(rows))
    assert samples == [
        Sample(id="id0", task="hotpotqa", context="Passage 0. The item is number 0.", question="What is item 0?",
               answers=("number 0",), all_classes=None, length=7),
        Sample(id="id1", task="trec", context="Passage 1. The item is number 1.", question="What is item 1?",
               answers=("a",), all_classes=("a", "b"), length=7),
    ]


def test_sample_round_trips_through_a_row(write_rows, make_row):
    sample = load_samples(write_rows([make_row(3, all_classes=["x"])]))[0]
    assert load_samples(write_rows([sample.to_row()], name="again.jsonl"))[0] == sample


def test_defaults_for_missing_optional_columns(write_rows):
    path = write_rows([{"context": "one two three", "input": "q", "answers": ["a"]}], name="mytask.jsonl")
    sample = load_samples(path)[0]
    assert (sample.id, sample.task, sample.length, sample.all_classes) == ("mytask-0", "mytask", 3, None)


def test_column_map_renames_source_columns(write_rows):
    path = write_rows([{"passage": "text here", "question": "why?", "answers": ["because"], "id": "x"}])
    sample = load_samples(path, column_map={"passage": "context", "question": "input", "id": "_id"})[0]
    assert (sample.context, sample.question, sample.id) == ("text here", "why?", "x")


def test_limit_keeps_first_rows(write_rows, make_row):
    samples = load_samples(write_rows([make_row(i) for i in range(5)]), limit=2)
    assert [s.id for s in samples] == ["id0", "id1"]


def test_json_array_and_parquet_load(tmp_path, make_row):
    rows = [make_row(0), make_row(1)]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    assert [s.id for s in load_samples(tmp_path / "rows.json")] == ["id0", "id1"]
    from datasets import Dataset

    Dataset.from_list(rows).to_parquet(str(tmp_path / "rows.parquet"))
    assert [s.id for s in load_samples(tmp_path / "rows.parquet")] == ["id0", "id1"]


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl does not exist"):
        load_samples(tmp_path / "nope.jsonl")


def test_malformed_json_line_names_file_and_line(write_rows, make_row):
    path = write_rows([make_row(0), make_row(1), '{"context": "x", "input": ', make_row(3)])
    with pytest.raises(DataError) as err:
        load_samples(path)
    message = str(err.value)
    assert f"{path}:3:" in message and "malformed JSON" in message and "\n" not in message


def test_row_missing_a_column_names_row_column_and_column_map(write_rows, make_row):
    bad = make_row(1)
    del bad["input"]
    path = write_rows([make_row(0), bad])
    with pytest.raises(DataError) as err:
        load_samples(path)
    message = str(err.value)
    assert ":2 (row 2" in message and "'input'" in message and "--column-map" in message


@pytest.mark.parametrize("answers", [[], "just a string", ["ok", 3], None])
def test_bad_answers_are_rejected(write_rows, make_row, answers):
    path = write_rows([make_row(0, answers=answers)])
    with pytest.raises(DataError, match="answers"):
        load_samples(path)


def test_empty_file_is_rejected(write_rows):
    with pytest.raises(DataError, match="has no rows"):
        load_samples(write_rows(["", "  "]))


def test_column_map_errors(write_rows, make_row):
    path = write_rows([make_row(0)])
    with pytest.raises(ConfigError, match="not a canonical column"):
        load_samples(path, column_map={"input": "query"})
    with pytest.raises(DataError, match="source column 'question'.*--column-map"):
        load_samples(path, column_map={"question": "input"})


def test_hub_id_offline_fails_with_a_clear_message(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'owner/name' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as err:
        load_samples("owner/name")
    assert "owner/name" in str(err.value) and "local .jsonl" in str(err.value)


def test_limit_must_be_positive(write_rows, make_row):
    with pytest.raises(ConfigError, match="--limit"):
        load_samples(write_rows([make_row(0)]), limit=0)


def test_spread_over_tasks_takes_each_task_in_turn():
    from polykv_search.data import Sample, spread_over_tasks

    rows = [Sample(id=f"{t}{i}", task=t, context="c", question="q", answers=("a",)) for t in "abc" for i in range(3)]
    picked = spread_over_tasks(rows, 4)
    assert [s.id for s in picked] == ["a0", "a1", "b0", "c0"]  # file order kept, every task present
    assert spread_over_tasks(rows, None) == rows and spread_over_tasks(rows, 99) == rows
