"""The plan file's JSON Schema (Draft 2020-12), shipped as package data in polykv_search/schemas/plan-v2.json.

Version 2 adds per-KV-head entries (a layer's `heads`) and the "tokens per KV head" unit; every 1.x plan is a
valid 2.x plan with the same meaning. 2.1 adds a rung's optional `context` (the prompt lengths it serves, the
lengths it was made on): a budget may then have one rung per range of prompt lengths, and the runtime picks by
the prompt's length. 2.2 adds the file's `question_aware`: true when the plan was made for prompts whose question
is prefilled and compressed with the context (kvpress's `compress_questions`); absent, the question follows the
compressed cache, the setting every earlier file was made in. A file is written with the lowest version that can
hold it (1.0.0 unless a layer has heads, 2.0.0 unless a rung has a context, 2.1.0 unless it is question-aware), so
older readers keep reading what they can.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

SCHEMA_VERSION = "2.2.0"  # the newest version this package writes (plans for the question-aware setting)
QUESTION_VERSION = "2.2.0"  # written for plans made with the question compressed with the context
LENGTH_VERSION = "2.1.0"  # written for plans with a rung's `context` (the prompt lengths it serves)
PER_HEAD_VERSION = "2.0.0"  # written for per-head plans without lengths: readable by 2.0 readers too
PER_LAYER_VERSION = "1.0.0"  # written for plans that are per layer only: readable by 1.x readers too
READABLE_MAJORS = (1, 2)
UNIT_PER_LAYER = "tokens per layer"
UNIT_PER_HEAD = "tokens per KV head"
SCHEMA_RESOURCE = "schemas/plan-v2.json"


def load_schema() -> dict[str, Any]:
    """Read the schema from the installed package (works from a wheel or a source checkout)."""
    text = resources.files("polykv_search").joinpath(SCHEMA_RESOURCE).read_text(encoding="utf-8")
    return json.loads(text)


PLAN_SCHEMA: dict[str, Any] = load_schema()
