"""The model families polykv-search runs: those kvpress supports, each checked on a tiny model by the tests.

A family is a transformers `model_type`. Adding one: its attention module must expose what kvpress's scorers read
(`q_proj`, or a fused `qkv_proj`; `q_norm` where queries are normalised), its decoder layers must be found by
`models.anatomy.decoder_layers`, and its layers must call the registered attention function with `position_ids`
in their keyword arguments; then add it here and to the tests' FAMILIES (tests/conftest.py) and run them.
"""

from __future__ import annotations

from polykv_search.errors import ModelError

FAMILIES: dict[str, str] = {  # model_type -> what users call it
    "llama": "Llama (also SmolLM2)",
    "mistral": "Mistral",
    "phi3": "Phi-3",
    "qwen2": "Qwen2",
    "qwen3": "Qwen3",
    "gemma3_text": "Gemma-3 (text)",
    "gemma3": "Gemma-3",
}


def check_family(model_type: str | None, *, source: str) -> None:
    """ModelError unless `model_type` is a supported family; says which ones are."""
    if model_type not in FAMILIES:
        names = ", ".join(dict.fromkeys(FAMILIES.values()))
        raise ModelError(f"model {source} is a {model_type or 'model of unknown type'!r}, a family polykv-search does "
                         f"not run; it runs {names} (kvpress's families). See the README's 'Model families' to add "
                         "one")
