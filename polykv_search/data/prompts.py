"""Per-task prompts split into a compressible context part and an uncompressed question part (kvpress convention).

`build_prompt` renders the whole conversation once (chat template when the tokenizer has one), tokenizes it
with offsets and cuts the ids where the context text ends; an over-long context is cut in the middle. In the
question-aware setting (kvpress's evaluation with `compress_questions`) the cut moves to where the user's turn
ends: the question is prefilled and compressed with the context, and only the end of the turn, the assistant's
header and the answer prefix follow the compressed cache.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from polykv_search.data.sample import Sample, task_key
from polykv_search.errors import DataError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptTemplate:
    """User turn = head + context + tail ("{input}" in tail is the question); the reply starts with a prefix.

    `chat=False` renders plain text even for chat models, as LongBench does for its completion-style tasks.
    `answer_sep` is what joins the prompt and the reference answer for teacher forcing ("\n" for a next line).
    """

    head: str
    tail: str
    max_new_tokens: int = 64
    answer_prefix: str | Callable[[str], str] = ""  # a string, or a function of the question
    chat: bool = True
    answer_sep: str | None = None  # text between prompt and answer; None: a space after a non-space character
    prefix_sep: str | None = None  # plain text only: between question and answer prefix; None: a space or a blank line

    def prefix_for(self, question: str) -> str:
        return self.answer_prefix(question) if callable(self.answer_prefix) else self.answer_prefix


@dataclass(frozen=True)
class PromptParts:
    """Token ids of one prompt: `context_ids` are compressed, `question_ids` are appended after compression."""

    context_ids: list[int]  # template header + instruction + context, ending where the context text ends
    question_ids: list[int]  # question, end of user turn, assistant header, answer prefix
    answer_ids: list[int]  # first reference answer as it would follow the prompt, for teacher forcing
    max_new_tokens: int
    truncated: bool
    task: str
    sample_id: str = ""
    answer_prefix: str = ""

    @property
    def prompt_ids(self) -> list[int]:
        return self.context_ids + self.question_ids


def _needle_prefix(question: str) -> str:
    match = re.search(r"special magic number for (.+?) mentioned in the provided text", question)
    key = match.group(1) if match else "it"
    return f"The special magic number for {key} mentioned in the provided text is"


def _continuation_prefix(question: str) -> str:
    match = re.search(r'begins with "(.*)"', question)
    return match.group(1) if match else ""


def _variable_prefix(question: str) -> str:
    match = re.search(r"hold the value (\d+)", question)
    value = match.group(1) if match else "asked"
    return f"Answer: According to the chain of variable assignments in the text above, the variables that " \
           f"hold the value {value} are: VAR"


def _repeat_question(question: str) -> str:
    return question


_NEEDLE_HEAD = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
                "I will quiz you about the numbers afterwards.\n\n")
_LB_QA = "Answer the question based on the given passages. Only give me the answer and do not output any other words."
_LB_QASPER = ("Answer the question as concisely as you can, using a single phrase or sentence if possible. If the "
              "question cannot be answered based on the information in the article, write \"unanswerable\". If the "
              "question is a yes/no question, answer \"yes\", \"no\", or \"unanswerable\". Do not provide any "
              "explanation.")
_LB_NARRATIVE = ("Answer the question as concisely as you can, using a single phrase if possible. Do not provide "
                 "any explanation.")

TEMPLATES: dict[str, PromptTemplate] = {
    # polykv-search's generated families
    "niah_single": PromptTemplate(_NEEDLE_HEAD, "\n\n{input}", 12, _needle_prefix),
    "niah_multikey": PromptTemplate(_NEEDLE_HEAD, "\n\n{input}", 12, _needle_prefix),
    # The reply lists names; the prefix ends in "VAR" so the first name follows directly.
    "variable_tracking": PromptTemplate(
        "Memorize and track the chain of variable assignments hidden in the following text.\n\n",
        "\n\nQuestion: {input}", 32, _variable_prefix),
    # Plain completion: the question is the last lines before the answer line (measured: an instruction or a
    # chat turn around code cut SmolLM2's edit similarity from ~0.45 to ~0.15).
    "code_completion": PromptTemplate("", "{input}", 48, chat=False, answer_sep="\n"),
    # The line to classify is repeated at the start of the reply, so "Code: ...\nKind:" is contiguous as in the
    # examples (measured: with the line only in the user turn SmolLM2 ignored the examples).
    "fewshot_classification": PromptTemplate(
        "Classify each line of Python code by the kind of statement it is. Here are some examples.\n\n",
        "\n\nClassify one more line the same way.", 6, _repeat_question),
    "prose_continuation": PromptTemplate("Read the following text.\n\n", "\n\n{input}", 48, _continuation_prefix),
    # LongBench (dataset2prompt.json); the question part starts where the context ends
    "narrativeqa": PromptTemplate(
        "You are given a story, which can be either a novel or a movie script, and a question. "
        f"{_LB_NARRATIVE}\n\nStory: ",
        "\n\nNow, answer the question based on the story as concisely as you can, using a single phrase if "
        "possible. Do not provide any explanation.\n\nQuestion: {input}\n\nAnswer:", 128),
    "qasper": PromptTemplate(f"You are given a scientific article and a question. {_LB_QASPER}\n\nArticle: ",
                             f"\n\n Answer the question based on the above article. {_LB_QASPER}\n\n"
                             "Question: {input}\n\nAnswer:", 128),
    "multifieldqa_en": PromptTemplate(
        "Read the following text and answer briefly.\n\n",
        "\n\nNow, answer the following question based on the above text, only give me the answer and do not "
        "output any other words.\n\nQuestion: {input}\nAnswer:", 64),
    "hotpotqa": PromptTemplate(f"{_LB_QA}\n\nThe following are given passages.\n",
                               f"\n\n{_LB_QA}\n\nQuestion: {{input}}\nAnswer:", 32),
    "gov_report": PromptTemplate(
        "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n",
        "\n\nNow, write a one-page summary of the report.\n\nSummary:", 512),
    "qmsum": PromptTemplate(
        "You are given a meeting transcript and a query containing a question or instruction. Answer the query "
        "in one or more sentences.\n\nTranscript:\n",
        "\n\nNow, answer the query based on the above meeting transcript in one or more sentences.\n\n"
        "Query: {input}\nAnswer:", 512),
    "multi_news": PromptTemplate("You are given several news articles. Write a one-page summary of all news. "
                                 "\n\nNews:\n", "\n\nNow, write a one-page summary of all the news.\n\nSummary:", 512),
    "trec": PromptTemplate("Please determine the type of the question below. Here are some examples of "
                           "questions.\n\n", "\n{input}", 64, chat=False),
    "triviaqa": PromptTemplate("Answer the question based on the given passage. Only give me the answer and do "
                               "not output any other words. The following are some examples.\n\n", "\n\n{input}", 32,
                               chat=False),
    "samsum": PromptTemplate("Summarize the dialogue into a few short sentences. The following are some "
                             "examples.\n\n", "\n\n{input}", 128, chat=False),
    "passage_count": PromptTemplate(
        "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please carefully "
        "read these paragraphs and determine how many unique paragraphs there are after removing duplicates. In "
        "other words, how many non-repeating paragraphs are there in total?\n\n",
        "\n\nPlease enter the final count of unique paragraphs after removing duplicates. The output format "
        "should only contain the number, such as 1, 2, 3, and so on.\n\nThe final answer is: ", 32),
    "passage_retrieval_en": PromptTemplate(
        "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which paragraph the "
        "abstract is from.\n\n",
        "\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the number of the paragraph that the "
        "abstract is from. The answer format must be like \"Paragraph 1\", \"Paragraph 2\", etc.\n\n"
        "The answer is: ", 32),
    "lcc": PromptTemplate("Please complete the code given below. \n", "{input}Next line of code:\n", 64,
                          chat=False),
    "repobench-p": PromptTemplate("Please complete the code given below. \n", "{input}Next line of code:\n", 64,
                                  chat=False),
}
TEMPLATES["2wikimqa"] = TEMPLATES["musique"] = TEMPLATES["hotpotqa"]
TEMPLATES["lsht"] = PromptTemplate("请判断给定新闻的类别，下面是一些例子。\n\n", "\n{input}", 64, chat=False)
DEFAULT_TEMPLATE = TEMPLATES["multifieldqa_en"]  # a generic "read, then answer briefly" prompt
# kvpress's rows hold their instructions: context + question + answer prefix, joined as kvpress's pipeline joins
# them (the question inside the user turn; a newline before the prefix in plain text); its answer room is 50.
AS_GIVEN_TEMPLATE = PromptTemplate("", "{input}", 50, prefix_sep="\n")


def has_template(task: str) -> bool:
    """True when `task` (or its LongBench-E base) has a template of its own rather than the generic one."""
    return task_key(task, TEMPLATES) is not None


def template_for(task: str) -> PromptTemplate:
    """The template for `task`; LongBench-E names ("lcc_e") use their base task, unknown tasks a generic QA one."""
    key = task_key(task, TEMPLATES)
    return TEMPLATES[key] if key is not None else DEFAULT_TEMPLATE


def template_for_sample(sample: Sample) -> PromptTemplate:
    """The template `sample` is prompted with: its task's (or, for a kvpress row, its text as given), with the
    row's own answer prefix and answer room when it has them."""
    template = AS_GIVEN_TEMPLATE if sample.templated else template_for(sample.task)
    if sample.answer_prefix is not None:
        template = replace(template, answer_prefix=sample.answer_prefix)
    if sample.max_new_tokens is not None:
        template = replace(template, max_new_tokens=sample.max_new_tokens)
    return template


def to_kvpress_form(sample: Sample) -> Sample:
    """`sample` as kvpress ships its data sets: the template's instructions moved into the context and the
    question, its answer prefix and answer room written on the row. With a chat tokenizer it prompts the same as
    `sample` for every task whose template is a chat one (kvpress renders every row as a chat turn)."""
    if sample.templated:
        return sample
    template = template_for_sample(sample)
    return replace(sample, context=template.head + sample.context,
                   question=template.tail.replace("{input}", sample.question),
                   answer_prefix=template.prefix_for(sample.question), max_new_tokens=template.max_new_tokens,
                   templated=True)


def build_prompt(sample: Sample, tokenizer: Any, *, max_context_tokens: int, add_bos: bool | None = None,
                 template: PromptTemplate | None = None, use_chat_template: bool | None = None,
                 question_aware: bool = False) -> PromptParts:
    """Tokenize `sample` as context part + question part, cutting the context in the middle if it is too long.

    `question_aware`: the question (the template's tail) belongs to the compressed part, as kvpress's evaluation
    with `compress_questions` prompts; the uncompressed part is then the end of the user turn and the answer prefix.

    `template=None` uses `template_for_sample`. The prompt (both parts) is kept within
    `max_context_tokens - max_new_tokens`. `add_bos=None` follows the chat template in chat mode and the
    tokenizer's default in plain mode; BOS is never doubled.
    `use_chat_template=None` uses the tokenizer's chat template when it has one and the task asks for chat.
    """
    template = template or template_for_sample(sample)
    has_chat = bool(getattr(tokenizer, "chat_template", None))
    chat = (has_chat and template.chat) if use_chat_template is None else use_chat_template
    limit = max_context_tokens - template.max_new_tokens
    if limit < 1:
        raise DataError(f"max_context_tokens {max_context_tokens} leaves no room for the prompt of task "
                        f"{sample.task} (answer room {template.max_new_tokens}); raise max_context_tokens")
    context = sample.context
    render = partial(_render, sample, tokenizer=tokenizer, template=template, chat=chat, add_bos=add_bos,
                     question_aware=question_aware)
    parts = render(context)
    truncated = False
    for _ in range(8):  # re-tokenising the joined halves can shift a few tokens; converge in a few rounds
        excess = len(parts[0]) + len(parts[1]) - limit
        if excess <= 0:
            break
        context = _cut_middle(context, tokenizer, drop=excess, sample=sample, limit=limit)
        parts = render(context)
        truncated = True
    else:
        raise DataError(f"sample {sample.id}: could not fit the prompt in {limit} tokens; raise max_context_tokens")
    if truncated:
        logger.warning("sample %s: context cut in the middle to fit %d prompt tokens (%d chars of %d kept)",
                       sample.id, limit, len(context), len(sample.context))
    context_ids, question_ids, answer_ids, prefix = parts
    return PromptParts(context_ids=context_ids, question_ids=question_ids, answer_ids=answer_ids,
                       max_new_tokens=template.max_new_tokens, truncated=truncated, task=sample.task,
                       sample_id=sample.id, answer_prefix=prefix)


def _render(sample: Sample, context: str, *, tokenizer: Any, template: PromptTemplate, chat: bool,
            add_bos: bool | None, question_aware: bool = False) -> tuple[list[int], list[int], list[int], str]:
    """Return (context_ids, question_ids, answer_ids, answer_prefix) for `context`."""
    tail = template.tail.replace("{input}", sample.question)
    prefix = template.prefix_for(sample.question)
    user = template.head + context + tail
    compressed = user if question_aware else template.head + context  # the text the cache is compressed over
    if chat:
        text = tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
        context_end = _find_end(text, compressed, context + tail if question_aware else context)
        text += prefix
    else:
        sep = template.prefix_sep if template.prefix_sep is not None else "\n\n" if "\n" in prefix else " "
        sep = sep if prefix and user and not user[-1].isspace() else ""
        text = user + sep + prefix
        context_end = len(compressed)
    context_ids, question_ids = _split_ids(tokenizer, text, context_end)
    if not question_ids and len(context_ids) > 1:  # question-aware plain text without an answer prefix: the last
        context_ids, question_ids = context_ids[:-1], context_ids[-1:]  # token stays out, so decoding has a query
    bos = _bos_to_add(tokenizer, text, add_bos=add_bos, chat=chat)
    if bos is not None:
        context_ids = [bos, *context_ids]
    answer = sample.answers[0]
    sep = template.answer_sep
    if sep is None:
        sep = " " if text and not text[-1].isspace() and not answer[:1].isspace() else ""
    _, answer_ids = _split_ids(tokenizer, text + sep + answer, len(text))
    return context_ids, question_ids, answer_ids, prefix


def _find_end(text: str, *probes: str) -> int:
    for probe in (*probes, probes[-1].strip()):
        if probe and (start := text.find(probe)) >= 0:
            return start + len(probe)
    raise DataError("the chat template changed the context text so it cannot be located in the prompt; "
                    "pass use_chat_template=False")


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _split_ids(tokenizer: Any, text: str, cut: int) -> tuple[list[int], list[int]]:
    """Tokenize `text` once and split the ids at character `cut`; if a token spans the cut, encode each side."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(encoded["input_ids"]), list(encoded["offset_mapping"])
    n = next((i for i, (start, _) in enumerate(offsets) if start >= cut), len(ids))
    if n == 0 or offsets[n - 1][1] <= cut:
        return ids[:n], ids[n:]
    logger.debug("a token spans the split at char %d; encoding the two sides separately", cut)
    return _encode(tokenizer, text[:cut]), _encode(tokenizer, text[cut:])


def _bos_to_add(tokenizer: Any, text: str, *, add_bos: bool | None, chat: bool) -> int | None:
    """BOS to prepend: never twice; by default none in chat mode (the template is authoritative, as in
    transformers' apply_chat_template) and the tokenizer's own habit in plain mode."""
    bos_id, bos_token = getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "bos_token", None)
    if bos_id is None or add_bos is False or (bos_token and text.startswith(bos_token)):
        return None
    if add_bos is None and chat:
        return None
    if add_bos is None:
        probe = tokenizer("a")["input_ids"]
        if not probe or probe[0] != bos_id:
            return None
    return int(bos_id)


def _cut_middle(context: str, tokenizer: Any, *, drop: int, sample: Sample, limit: int) -> str:
    """Drop `drop` tokens from the middle of `context`, keeping equal token counts of head and tail (LongBench)."""
    offsets = list(tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"])
    keep = len(offsets) - drop
    if keep < 2:
        raise DataError(f"sample {sample.id}: the template and question alone take more than {limit} tokens; "
                        "raise max_context_tokens or shorten the question")
    head, tail = keep // 2, keep - keep // 2
    return context[:offsets[head - 1][1]] + context[offsets[len(offsets) - tail][0]:]
