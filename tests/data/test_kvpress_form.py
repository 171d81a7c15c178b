"""Rows in kvpress's form (RULER, the needle sets, LongBench as kvpress ships it) load without a column map and
are prompted as given, with the row's own answer prefix and answer room; unknown tasks say what they fall back to."""

from __future__ import annotations

import logging
import uuid

import pytest

from polykv_search.data import Sample, build_prompt, load_samples, to_kvpress_form
from polykv_search.data.generate import generate_split
from polykv_search.errors import DataError


def _needles() -> list[Sample]:
    return generate_split("calib", seed=0, per_family=1, min_tokens=120, max_tokens=200,
                          families=["niah_single", "niah_multikey", "variable_tracking", "prose_continuation",
                                    "fewshot_classification"])


def test_a_ruler_style_file_prompts_as_the_built_in_task(write_rows, chat_tokenizer):
    built_in = _needles()
    rows = []
    for sample in built_in:
        row = to_kvpress_form(sample).to_row()
        row["task"] = sample.task
        rows.append(row)
    assert "input" not in rows[0] and rows[0]["answer_prefix"].startswith("The special magic number for")
    loaded = load_samples(write_rows(rows, name="ruler.jsonl"))
    assert all(s.templated for s in loaded)
    for original, kvpress_row in zip(built_in, loaded, strict=True):
        expected = build_prompt(original, chat_tokenizer, max_context_tokens=4096)
        got = build_prompt(kvpress_row, chat_tokenizer, max_context_tokens=4096)
        assert got.context_ids == expected.context_ids, original.task
        assert got.question_ids == expected.question_ids, original.task
        assert got.answer_ids == expected.answer_ids, original.task
        assert (got.max_new_tokens, got.answer_prefix) == (expected.max_new_tokens, expected.answer_prefix)


def test_kvpress_columns_map_to_the_sample(write_rows, chat_tokenizer):
    row = {"context": "Some text. The key is 42.", "question": "\nWhat is the key?", "answer": "42",
           "task": "niah_single_1", "answer_prefix": "The key is", "max_new_tokens": 7}
    sample = load_samples(write_rows([row]))[0]
    assert (sample.task, sample.question, sample.answers, sample.answer_prefix, sample.max_new_tokens) == \
        ("niah_single_1", "\nWhat is the key?", ("42",), "The key is", 7)
    parts = build_prompt(sample, chat_tokenizer, max_context_tokens=4096)
    text = chat_tokenizer.decode(parts.prompt_ids, skip_special_tokens=False)
    assert text == ("<|im_start|>user\nSome text. The key is 42.\nWhat is the key?<|im_end|>\n"
                    "<|im_start|>assistant\nThe key is")
    assert parts.max_new_tokens == 7 and parts.answer_prefix == "The key is"
    assert load_samples(write_rows([sample.to_row()], name="again.jsonl"))[0] == sample


def test_plain_text_joins_as_kvpress_does(write_rows, plain_tokenizer):
    row = {"context": "Some text.", "question": " Q?", "answers": ["a"], "answer_prefix": "A:"}
    sample = load_samples(write_rows([row]))[0]
    parts = build_prompt(sample, plain_tokenizer, max_context_tokens=4096)
    assert plain_tokenizer.decode(parts.question_ids) == " Q?\nA:"
    assert parts.max_new_tokens == 50  # kvpress's pipeline default when a row gives none


def test_a_longbench_row_may_carry_its_own_prefix_and_room(write_rows, make_row, chat_tokenizer):
    sample = load_samples(write_rows([make_row(0, answer_prefix="Answer: item", max_new_tokens=5)]))[0]
    assert not sample.templated
    parts = build_prompt(sample, chat_tokenizer, max_context_tokens=4096)
    assert parts.answer_prefix == "Answer: item" and parts.max_new_tokens == 5
    assert chat_tokenizer.decode(parts.question_ids).endswith("Answer:<|im_end|>\n<|im_start|>assistant\nAnswer: item")


@pytest.mark.parametrize(("column", "value", "message"), [
    ("answer_prefix", 3, "'answer_prefix' must be a string"),
    ("max_new_tokens", 0, "'max_new_tokens' must be a positive integer"),
    ("max_new_tokens", "ten", "'max_new_tokens' must be a positive integer"),
    ("answer", [], "'answer' must be a non-empty list"),
])
def test_bad_kvpress_columns_are_one_line(write_rows, column, value, message):
    row = {"context": "c", "question": "q", "answer": "a", column: value}
    with pytest.raises(DataError, match=message) as error:
        load_samples(write_rows([row]))
    assert "\n" not in str(error.value) and ":1 (row 1)" in str(error.value)


def test_unknown_tasks_say_their_fallbacks_once(write_rows, make_row, caplog):
    my_qa, my_ruler = f"my_qa_{uuid.uuid4().hex[:8]}", f"my_ruler_{uuid.uuid4().hex[:8]}"  # once per process
    rows = [make_row(0, dataset=my_qa), make_row(1, dataset=my_qa), make_row(2, dataset="hotpotqa"),
            {"context": "c", "question": "q", "answer": "a", "task": my_ruler},
            {"context": "c", "question": "q", "answer": "a", "task": "niah_single_1"}]
    with caplog.at_level(logging.WARNING, logger="polykv_search.data.loading"):
        load_samples(write_rows(rows))
        load_samples(write_rows(rows, name="again.jsonl"))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    qa_line = next(line for line in lines if f"'{my_qa}'" in line)
    assert "scored with qa_f1" in qa_line and "generic read-then-answer template" in qa_line
    ruler_line = next(line for line in lines if f"'{my_ruler}'" in line)
    assert "scored with qa_f1" in ruler_line and "template" not in ruler_line  # a kvpress row brings its prompt
