"""A long real-prose sample for the benchmarks that need a given context length (pydoc's reference text, with a
needle in the middle), built for any tokenizer."""

from __future__ import annotations

import pydoc_data.topics as topics

from polykv_search.data import Sample


def long_sample(tokenizer, n_tokens: int) -> Sample:
    """A sample of about n_tokens context tokens (200 fewer, leaving room for the question and answer)."""
    text = "\n\n".join(topics.topics.values())
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: n_tokens - 200]
    context = tokenizer.decode(ids)
    middle = len(context) // 2
    context = context[:middle] + "\nThe special magic number is 531902.\n" + context[middle:]
    return Sample(id="long", task="needle_qa", context=context, question="What is the special magic number?",
                  answers=("531902",), all_classes=None, length=len(context.split()))
