"""The plan file's JSON Schema (Draft 2020-12), shipped as package data in polykv_search/schemas/plan-v2.json.

Version 2 adds per-KV-head entries (a layer's `heads`) and the "tokens per KV head" unit; every 1.x plan is a
valid 2.x plan with the same meaning. A file is written with the lowest version that can hold it (1.0.0 unless a
layer has heads), so readers that know only version 1 keep reading per-layer plans, and refuse per-head ones by
their version rule.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

SCHEMA_VERSION = "2.0.0"  # the newest version this package writes (per-head plans)
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
