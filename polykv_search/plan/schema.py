"""The plan file's JSON Schema (Draft 2020-12), shipped as package data in polykv_search/schemas/plan-v1.json."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

SCHEMA_VERSION = "1.0.0"  # written into every plan; readers of major version 1 accept 1.x.y
SCHEMA_MAJOR = 1
SCHEMA_RESOURCE = "schemas/plan-v1.json"


def load_schema() -> dict[str, Any]:
    """Read the schema from the installed package (works from a wheel or a source checkout)."""
    text = resources.files("polykv_search").joinpath(SCHEMA_RESOURCE).read_text(encoding="utf-8")
    return json.loads(text)


PLAN_SCHEMA: dict[str, Any] = load_schema()
