"""build_prompt: the context/question split point, BOS handling, templates, and middle truncation."""

from __future__ import annotations

import logging

import pytest

from polykv_search.data import PromptTemplate, Sample, build_prompt, template_for
from polykv_search.data.prompts import DEFAULT_TEMPLATE, TEMPLATES
from polykv_search.errors import DataError

CONTEXT = "A Python program is constructed from code blocks. Names refer to objects. " * 20 + "The end."
NEEDLE_Q = "What is the special magic number for lucky-cat mentioned in the provided text?"


def _sample(task: str = "niah_single", context: str = CONTEXT, question: str = NEEDLE_Q,
            answers: tuple[str, ...] = ("123456",)) -> Sample:
    return Sample(id="s1", task=task, context=context, question=question, answers=answers)


def _decode(tokenizer, ids):  # type: ignore[no-untyped-def]
    return tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def test_chat_split_ends_exactly_at_the_context(chat_tokenizer):
    parts = build_prompt(_sample(), chat_tokenizer, max_context_tokens=4096)
    head = _decode(chat_tokenizer, parts.context_ids)
    rest = _decode(chat_tokenizer, parts.question_ids)
    assert head.startswith("<|im_start|>user\nSome special magic numbers")
    assert head.endswith(CONTEXT)
    assert rest == (f"\n\n{NEEDLE_Q}<|im_end|>\n<|im_start|>assistant\n"
                    "The special magic number for lucky-cat mentioned in the provided text is")
    assert parts.answer_prefix.endswith("is") and parts.max_new_tokens >= 8
    assert _decode(chat_tokenizer, parts.answer_ids) == " 123456"
    assert parts.context_ids.count(chat_tokenizer.bos_token_id) == 0  # the template starts with its own header
    assert not parts.truncated and parts.task == "niah_single"


def test_plain_prompt_for_completion_tasks_and_bos(chat_tokenizer, plain_tokenizer):
    code = "def parse(self, text):\n    return self.decode(text)\n\ndef parse(self, text):"
    sample = _sample("code_completion", context=code, question="\n    text = text.strip()",
                     answers=("    return self.decode(text)",))
    for tokenizer in (chat_tokenizer, plain_tokenizer):  # code completion is plain text even with a chat template
        parts = build_prompt(sample, tokenizer, max_context_tokens=512)
        assert parts.context_ids[0] == tokenizer.bos_token_id  # the tokenizer adds BOS by default
        assert _decode(tokenizer, parts.context_ids[1:]) == code
        assert _decode(tokenizer, parts.question_ids) == "\n    text = text.strip()"
        assert _decode(tokenizer, parts.answer_ids) == "\n    return self.decode(text)"  # the next line, indented
    parts = build_prompt(sample, plain_tokenizer, max_context_tokens=512, add_bos=False)
    assert plain_tokenizer.bos_token_id not in parts.context_ids


def test_plain_rendering_of_a_chat_task(plain_tokenizer):
    parts = build_prompt(_sample(), plain_tokenizer, max_context_tokens=4096, add_bos=True)
    assert parts.context_ids.count(plain_tokenizer.bos_token_id) == 1
    assert _decode(plain_tokenizer, parts.context_ids).endswith(CONTEXT)
    assert _decode(plain_tokenizer, parts.question_ids).startswith(f"\n\n{NEEDLE_Q} The special magic number")
    fewshot = Sample(id="f", task="fewshot_classification", context="Code: import os\nKind: import",
                     question="Code: import sys\nKind:", answers=("import",))
    parts = build_prompt(fewshot, plain_tokenizer, max_context_tokens=512)
    assert _decode(plain_tokenizer, parts.question_ids).endswith("same way.\n\nCode: import sys\nKind:")


def test_fewshot_repeats_the_line_to_classify_in_the_reply(chat_tokenizer):
    sample = Sample(id="f", task="fewshot_classification", context="Code: import os\nKind: import",
                    question="Code: import sys\nKind:", answers=("import",), all_classes=("import", "class"))
    parts = build_prompt(sample, chat_tokenizer, max_context_tokens=512)
    assert _decode(chat_tokenizer, parts.question_ids).endswith("assistant\nCode: import sys\nKind:")
    assert _decode(chat_tokenizer, parts.answer_ids) == " import"


def test_middle_truncation_keeps_head_and_tail_and_warns(chat_tokenizer, caplog):
    context = "HEAD " + " ".join(f"w{i}" for i in range(1500)) + " MIDDLE " + \
              " ".join(f"v{i}" for i in range(1500)) + " TAIL"
    sample = _sample(context=context)
    full = build_prompt(sample, chat_tokenizer, max_context_tokens=100_000)
    with caplog.at_level(logging.WARNING, logger="polykv_search.data.prompts"):
        parts = build_prompt(sample, chat_tokenizer, max_context_tokens=1000)
    assert parts.truncated and not full.truncated
    assert len(parts.context_ids) + len(parts.question_ids) <= 1000 - parts.max_new_tokens
    assert len(parts.context_ids) + len(parts.question_ids) >= 1000 - parts.max_new_tokens - 4
    assert parts.question_ids == full.question_ids  # the question is never cut
    text = _decode(chat_tokenizer, parts.context_ids)
    assert "HEAD w0 w1" in text and text.endswith("v1499 TAIL") and "MIDDLE" not in text
    assert any("s1" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)


def test_no_room_for_the_question_is_an_error(chat_tokenizer):
    with pytest.raises(DataError, match="raise max_context_tokens"):
        build_prompt(_sample(), chat_tokenizer, max_context_tokens=30)


def test_template_lookup():
    assert template_for("hotpotqa") is TEMPLATES["hotpotqa"]
    assert template_for("lcc_e") is TEMPLATES["lcc"]
    assert template_for("unknown-task") is DEFAULT_TEMPLATE
    assert not TEMPLATES["trec"].chat and TEMPLATES["narrativeqa"].chat
    for name, template in TEMPLATES.items():
        assert "{input}" in template.tail or name in {"gov_report", "multi_news", "passage_count",
                                                       "fewshot_classification"}, name


def test_unknown_task_uses_the_generic_qa_prompt(chat_tokenizer):
    parts = build_prompt(_sample(task="my_qa", question="Who?"), chat_tokenizer, max_context_tokens=4096)
    assert "Question: Who?\nAnswer:" in _decode(chat_tokenizer, parts.question_ids)
    assert parts.max_new_tokens == DEFAULT_TEMPLATE.max_new_tokens


def test_custom_template(chat_tokenizer):
    template = PromptTemplate("Read:\n", " Q: {input}", 5, "A:")
    parts = build_prompt(_sample(), chat_tokenizer, max_context_tokens=4096, template=template)
    assert _decode(chat_tokenizer, parts.question_ids).endswith(f" Q: {NEEDLE_Q}<|im_end|>\n<|im_start|>assistant\nA:")


@pytest.mark.slow
def test_real_smollm2_tokenizer_split_and_digits():
    from polykv_search.models import load_model

    tokenizer = load_model("smollm2-135m").tokenizer
    parts = build_prompt(_sample(), tokenizer, max_context_tokens=8192)
    assert _decode(tokenizer, parts.context_ids).endswith(CONTEXT)
    assert _decode(tokenizer, parts.question_ids).endswith("provided text is")
    assert len(parts.answer_ids) == 7 and parts.max_new_tokens >= 8  # " " + six single-digit tokens


def test_question_aware_split_compresses_the_question_with_the_context(chat_tokenizer, plain_tokenizer):
    """kvpress's compress_questions: the question belongs to the compressed part; the end of the user turn, the
    assistant header and the answer prefix follow it. The whole prompt is the same token for token."""
    agnostic = build_prompt(_sample(), chat_tokenizer, max_context_tokens=4096)
    aware = build_prompt(_sample(), chat_tokenizer, max_context_tokens=4096, question_aware=True)
    assert aware.prompt_ids == agnostic.prompt_ids and aware.answer_ids == agnostic.answer_ids
    assert _decode(chat_tokenizer, aware.context_ids).endswith(f"{CONTEXT}\n\n{NEEDLE_Q}")
    assert _decode(chat_tokenizer, aware.question_ids) == (
        "<|im_end|>\n<|im_start|>assistant\nThe special magic number for lucky-cat mentioned in the provided text is")
    plain = build_prompt(_sample(), plain_tokenizer, max_context_tokens=4096, add_bos=True, question_aware=True)
    assert _decode(plain_tokenizer, plain.context_ids).endswith(f"{CONTEXT}\n\n{NEEDLE_Q}")
    assert _decode(plain_tokenizer, plain.question_ids).startswith(" The special magic number")


def test_question_aware_truncation_keeps_the_question(chat_tokenizer):
    """A cut context keeps the whole question in the compressed part (the middle of the context goes)."""
    full = build_prompt(_sample(), chat_tokenizer, max_context_tokens=4096, question_aware=True)
    cut = build_prompt(_sample(), chat_tokenizer, max_context_tokens=len(full.prompt_ids) - 40 + 12,
                       question_aware=True)
    assert cut.truncated and len(cut.prompt_ids) <= len(full.prompt_ids) - 40
    assert _decode(chat_tokenizer, cut.context_ids).endswith(f"The end.\n\n{NEEDLE_Q}")
    assert cut.question_ids == full.question_ids
