"""Fixtures for the data tests: a tiny byte-level BPE tokenizer built in code, and LongBench-style rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = [
    "The special magic number for lucky-cat is: 123456. What is the special magic number?",
    "Some special magic numbers are hidden within the following text. Make sure to memorize them.",
    "def parse(self, text):\n    return self.decode(text)\n",
    "A Python program is constructed from code blocks. Names refer to objects. HEAD TAIL MIDDLE",
] * 20


def _tiny_tokenizer(*, chat: bool, bos_in_post: bool):  # type: ignore[no-untyped-def]
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS, trainer)
    if bos_in_post:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                           special_tokens=[("<s>", tok.token_to_id("<s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE if chat else None
    return fast


@pytest.fixture(scope="session")
def chat_tokenizer():  # type: ignore[no-untyped-def]
    """A byte-level BPE tokenizer with a ChatML template that adds BOS by default (like SmolLM2's GGUF one)."""
    return _tiny_tokenizer(chat=True, bos_in_post=True)


@pytest.fixture(scope="session")
def plain_tokenizer():  # type: ignore[no-untyped-def]
    """The same tokenizer without a chat template (like a base model); it adds BOS by default."""
    return _tiny_tokenizer(chat=False, bos_in_post=True)


def longbench_row(i: int, **overrides: object) -> dict[str, object]:
    row: dict[str, object] = {
        "input": f"What is item {i}?",
        "context": f"Passage {i}. The item is number {i}.",
        "answers": [f"number {i}"],
        "length": 7,
        "dataset": "hotpotqa",
        "language": "en",
        "all_classes": None,
        "_id": f"id{i}",
    }
    row.update(overrides)
    return row


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def make_row():  # type: ignore[no-untyped-def]
    """Factory of LongBench rows: make_row(i, **overrides)."""
    return longbench_row


@pytest.fixture
def write_rows(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Write rows (dicts as JSON, strings verbatim) as JSON lines to tmp_path/name."""
    def write(rows: list[object], name: str = "data.jsonl") -> Path:
        return write_jsonl(tmp_path / name, rows)

    return write
