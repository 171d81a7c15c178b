"""Real text present on every CPython install: standard-library source files and the pydoc topics prose.

Each source document (one topic, one stdlib file) belongs to exactly one split, chosen by a hash of its name,
so generated splits never share a passage. The `long` split reads CPython's own test suite, which no other
split reads, with its prose de-duplicated against theirs.
"""

from __future__ import annotations

import ast
import hashlib
import re
import sysconfig
import warnings
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydoc_data.topics import topics

from polykv_search.errors import DataError

Split = Literal["calib", "eval", "eval_alt", "long", "calib_long"]
SPLITS: tuple[Split, ...] = ("calib", "eval", "eval_alt")  # the splits that share the hashed partition
LONG: Split = "long"  # 6k-8k-token contexts from the test suite (a source of its own)
# Long calibration contexts: the test-suite text that `long` did not use (generate.generate_calib_long)
CALIB_LONG: Split = "calib_long"

# Partition B (eval_alt) takes 40% of the documents; partition A is shared 1:2 between calib and eval.
_B_SHARE = 0.40
_CALIB_SHARE_OF_A = 1 / 3
# Folders and files that are tests, machine-specific, generated tables or not real prose/code.
_SKIP_PARTS = frozenset({"test", "tests", "idle_test", "site-packages", "encodings", "pydoc_data", "__pycache__",
                         "__phello__", "_bundled"})
_SKIP_FILES = frozenset({"this.py", "antigravity.py", "__hello__.py", "keyword.py", "token.py", "stringprep.py"})
# The test-suite folders, skipped above: the long split's source.
_TEST_PARTS = frozenset({"test", "tests", "idle_test"})
# A comment line that is code (commented-out statements), not prose: it ends a comment paragraph.
_CODE_COMMENT = re.compile(r"^(self\.|return\b|import\s|from\s\S+\simport|def\s|class\s|assert\b|print\()|[;{}]|\s=\s|"
                           r"\w\(.*\)$")


@dataclass(frozen=True)
class Document:
    """One source: `paragraphs` is its prose (one string per paragraph), `code` its source text if any."""

    id: str  # "topic:<key>" or "file:<path relative to the stdlib folder>"
    paragraphs: tuple[str, ...]
    code: str = ""


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def partition_of(doc_id: str) -> Split:
    """The split a document belongs to: a fixed function of its id, independent of the seed."""
    h1 = _unit_hash("partition-AB", doc_id)
    if h1 < _B_SHARE:
        return "eval_alt"
    return "calib" if _unit_hash("partition-A", doc_id) < _CALIB_SHARE_OF_A else "eval"


def _unit_hash(salt: str, name: str) -> float:
    digest = hashlib.sha256(f"polykv-search:{salt}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def prose_paragraphs(text: str) -> list[str]:
    """Paragraphs of running prose in reST-like text: no indented blocks, headings, lists or doctests."""
    out: list[str] = []
    for block in re.split(r"\n[ \t]*\n", text):
        lines = [line for line in block.split("\n") if line.strip()]
        if not lines or any(line.startswith((" ", "\t")) for line in lines):
            continue
        if any(line.strip().startswith((">>>", "...", "-", "*", ":", "+", "|", "=", "#")) for line in lines):
            continue
        paragraph = " ".join(" ".join(line.split()) for line in lines)
        words = re.findall(r"[A-Za-z]+", paragraph)
        if len(paragraph) < 80 or not paragraph.endswith(".") or len(words) < 12 or "``" in paragraph \
                or not paragraph[0].isupper() or "\\" in paragraph:
            continue
        out.append(paragraph)
    return out


def split_sentences(paragraph: str) -> list[str]:
    """Sentences of a paragraph, split after . ! ? followed by a space and a capital letter or quote."""
    parts = re.split(r"(?<=[.!?])\s+(?=[A-Z\"'(])", paragraph)
    return [p.strip() for p in parts if p.strip()]


@lru_cache(maxsize=1)
def topic_documents() -> tuple[Document, ...]:
    """The pydoc reference topics (`pydoc_data/topics.py`, PSF licence) as prose documents."""
    docs = (Document(id=f"topic:{key}", paragraphs=tuple(prose_paragraphs(topics[key]))) for key in sorted(topics))
    return tuple(doc for doc in docs if doc.paragraphs)


@lru_cache(maxsize=1)
def stdlib_documents() -> tuple[Document, ...]:
    """Every non-test stdlib .py file: its source text and the prose of its docstrings, in source order."""
    root = stdlib_root()
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _SKIP_PARTS or part.startswith(("test_", "config-", "_sysconfigdata")) for part in rel.parts) \
                or rel.name in _SKIP_FILES:
            continue
        parsed = _read_python(path)
        if parsed:
            docs.append(Document(id=f"file:{rel.as_posix()}", paragraphs=tuple(_docstring_prose(parsed[1])),
                                 code=parsed[0]))
    return tuple(docs)


def _read_python(path: Path) -> tuple[str, ast.AST] | None:
    """A file's source and syntax tree; None when it does not parse or is a generated table."""
    try:
        code = path.read_text(encoding="utf-8")
        with warnings.catch_warnings():  # the test suite holds invalid escapes on purpose
            warnings.simplefilter("ignore", (SyntaxWarning, DeprecationWarning))
            tree = ast.parse(code)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return None
    lines = code.splitlines()
    if not lines or sum(map(len, lines)) / len(lines) > 80:  # generated tables, not code people write
        return None
    return code, tree


def _docstring_prose(tree: ast.AST) -> list[str]:
    nodes = [n for n in _statements(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                                             ast.AsyncFunctionDef))]
    nodes.sort(key=lambda n: getattr(n, "lineno", 0))
    out: list[str] = []
    for node in nodes:
        doc = ast.get_docstring(node)
        if doc:
            out.extend(prose_paragraphs(doc))
    return out


def _statements(tree: ast.AST) -> list[ast.AST]:
    """The module and every statement in it (what `ast.walk` would give, without descending into expressions,
    where no definition can be: 5x faster on the test suite)."""
    out, stack = [], [tree]
    while stack:
        node = stack.pop()
        out.append(node)
        stack.extend(child for child in ast.iter_child_nodes(node)
                     if isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)))
    return out


def _comment_prose(code: str) -> list[str]:
    """Prose paragraphs of a file's whole-line comments: consecutive comment lines form a paragraph, which an
    empty comment, a code line or a commented-out statement ends. (Lines are read as text: a "#" line inside a
    string literal counts as a comment, which the prose filter then judges like any other.)"""
    blocks: list[list[str]] = [[]]
    for line in code.splitlines():
        stripped = line.strip()
        text = stripped.lstrip("#").strip() if stripped.startswith("#") else ""
        if text and not _CODE_COMMENT.search(text):
            blocks[-1].append(text)
        elif blocks[-1]:
            blocks.append([])
    return prose_paragraphs("\n\n".join(" ".join(block) for block in blocks if block))


def sentence_key(sentence: str) -> str | None:
    """A sentence's identity for de-duplication (lower-case words), or None when it is too short to matter."""
    words = re.findall(r"\w+", sentence.lower())
    return " ".join(words) if len(words) >= 6 else None


@lru_cache(maxsize=1)
def all_documents() -> tuple[Document, ...]:
    """Every document, with prose de-duplicated across documents: the pydoc topics repeat one another (the
    "compound" topic holds the "for" and "while" text) and docstrings repeat across classes, so a paragraph
    is kept only in the first document (by id) that has none of its sentences seen before."""
    seen: set[str] = set()
    out = []
    for doc in sorted((*topic_documents(), *stdlib_documents()), key=lambda d: d.id):
        kept = []
        for paragraph in doc.paragraphs:
            keys = {k for k in map(sentence_key, split_sentences(paragraph)) if k}
            if keys & seen:
                continue
            seen |= keys
            kept.append(paragraph)
        out.append(replace(doc, paragraphs=tuple(kept)))
    return tuple(out)


@lru_cache(maxsize=1)
def line_owners() -> dict[str, Split]:
    """For every stripped source line, the split of the first file (by id) that contains it: a line that
    occurs in files of several splits (e.g. "import os") is used by one split only."""
    owners: dict[str, Split] = {}
    for doc in all_documents():
        split = partition_of(doc.id)
        for line in doc.code.splitlines():
            owners.setdefault(line.strip(), split)
    return owners


def _sentence_keys(paragraph: str) -> set[str]:
    return {k for k in map(sentence_key, split_sentences(paragraph)) if k}


@lru_cache(maxsize=1)
def long_documents() -> tuple[Document, ...]:
    """The long split's documents: every parseable .py file of the standard library's test suites (`test/`,
    `*/tests/`, `idlelib/idle_test/`), which no other split reads, with the prose of its docstrings and comments.

    Their prose is de-duplicated against every other split's (and within the suite, first file by id wins), so
    no sentence of the long split occurs in another split; code lines are kept apart in `make_pool`.
    """
    root = stdlib_root()
    seen = {key for doc in all_documents() for paragraph in doc.paragraphs for key in _sentence_keys(paragraph)}
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if not _TEST_PARTS & set(rel.parts) or (_SKIP_PARTS - _TEST_PARTS) & set(rel.parts):
            continue
        parsed = _read_python(path)
        if parsed is None:
            continue
        kept = []
        for paragraph in (*_docstring_prose(parsed[1]), *_comment_prose(parsed[0])):
            keys = _sentence_keys(paragraph)
            if not keys & seen:
                seen |= keys
                kept.append(paragraph)
        docs.append(Document(id=f"file:{rel.as_posix()}", paragraphs=tuple(kept), code=parsed[0]))
    return tuple(docs)


def documents_for(split: Split) -> list[Document]:
    """The documents of one split, in id order (file:... before topic:...), prose de-duplicated."""
    if split in (LONG, CALIB_LONG):
        if not long_documents():
            raise DataError(f"no test suite under {stdlib_root()}: the long split reads CPython's own tests; "
                            "install them (Debian: the libpython3.X-testsuite package) or use a python.org build")
        return list(long_documents())
    return [doc for doc in all_documents() if partition_of(doc.id) == split]
