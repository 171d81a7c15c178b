"""Atomic file writes and content hashes: a crash never leaves half a file behind, and a JSON file the project
reads back carries a checksum of its content (`seal` / `unseal`), so a damaged one is refused, never used."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from polykv_search.errors import OutputError

CHECKSUM_FIELD = "checksum"  # {"sha256": <hex>} at the top level of a sealed JSON object

def write_atomic(path: str | Path, data: bytes | str | Callable[[Path], None]) -> Path:
    """Write `data` (bytes, text, or a writer called with a temp path) to `path` via a rename."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}; give a writable path") from exc
    tmp = Path(tmp_name)
    try:
        if callable(data):
            os.close(fd)
            data(tmp)
        else:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data.encode() if isinstance(data, str) else data)
                handle.flush()
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        what = "is a folder" if isinstance(exc, IsADirectoryError) else f"cannot be written ({exc.strerror or exc})"
        raise OutputError(f"{path} {what}; give a writable file path") from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def check_writable(path: str | Path, *, option: str = "--out", example: str = "plan.json") -> Path:
    """An output file path, refused in one line before any work when it names a folder or its folder cannot take
    a new file (read-only, immutable, or under a file): a probe file is created and removed there."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{option} {path} is a folder; give a file name, e.g. {path / example}")
    above = next((parent for parent in path.parents if parent.exists()), Path("."))
    if not above.is_dir():
        raise OutputError(f"{option} {path}: {above} is a file, not a folder; give another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".polykv-probe.", suffix=".tmp", dir=above)
    except OSError as exc:
        raise OutputError(f"{option} {path}: cannot write in {above} ({exc.strerror or exc}); give a writable "
                          "path") from exc
    os.close(fd)
    os.unlink(probe)
    return path


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    return write_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def file_sha256(path: str | Path, *, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def content_sha256(obj: Any) -> str:
    """sha256 of `obj`'s canonical JSON (sorted keys, no spaces, UTF-8): the same content gives the same digest
    however the file is indented or its keys ordered. Infinity and NaN are written as Python's json writes them
    (a run fingerprint may hold `--probe-above inf`); a plan file refuses them before it is sealed."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def seal(obj: dict[str, Any]) -> dict[str, Any]:
    """`obj` with a top-level "checksum": {"sha256": ...} of the rest of its content (any old one replaced)."""
    content = {k: v for k, v in obj.items() if k != CHECKSUM_FIELD}
    return {**content, CHECKSUM_FIELD: {"sha256": content_sha256(content)}}


class SealError(ValueError):
    """A sealed JSON object whose checksum is missing (`missing`) or does not match its content."""

    def __init__(self, message: str, *, missing: bool) -> None:
        super().__init__(message)
        self.missing = missing


def unseal(obj: Any) -> dict[str, Any]:
    """The content of a sealed object (without its checksum); SealError when it has none or it does not match."""
    if not isinstance(obj, dict) or not isinstance(obj.get(CHECKSUM_FIELD), dict) \
            or not isinstance(obj[CHECKSUM_FIELD].get("sha256"), str):
        raise SealError("it has no checksum", missing=True)
    content = {k: v for k, v in obj.items() if k != CHECKSUM_FIELD}
    if content_sha256(content) != obj[CHECKSUM_FIELD]["sha256"]:
        raise SealError("its content does not match its checksum (damaged or edited)", missing=False)
    return content


def write_sealed_json(path: str | Path, obj: dict[str, Any]) -> Path:
    """Write `obj` sealed with its checksum, atomically: what `read_sealed_json` reads back."""
    return write_json_atomic(path, seal(obj))


def read_sealed_json(path: str | Path) -> dict[str, Any]:
    """The content of a sealed JSON file; SealError (missing or mismatched checksum), OSError or ValueError (not
    JSON, not UTF-8) for a file that cannot be trusted."""
    return unseal(json.loads(Path(path).read_text(encoding="utf-8")))
