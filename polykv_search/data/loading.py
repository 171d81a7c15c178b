"""Load rows (JSON lines, JSON, Parquet, or a hub data set) into `Sample`s, via `datasets`.

Two forms load as they are: LongBench's (`context`, `input`, `answers`, `dataset`, ...) and kvpress's
(`context`, `question`, `answer` or `answers`, `task`, `answer_prefix`, `max_new_tokens`), whose context and
question already hold the instructions. Other schemas load with a column map from source column to canonical
name, e.g. {"passage": "context"}.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import polykv_search.hub as hub
from polykv_search.data.sample import Sample, spread_over_tasks
from polykv_search.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("context", "input", "answers")  # LongBench's names; kvpress's question/answer/task also do
KVPRESS_COLUMNS = ("question", "answer", "task", "answer_prefix", "max_new_tokens")
CANONICAL_COLUMNS = (*REQUIRED_COLUMNS, "length", "dataset", "all_classes", "_id", *KVPRESS_COLUMNS)
_JSON_SUFFIXES = (".jsonl", ".json")
_SUFFIX_BUILDER = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_MAP_HINT = "pass --column-map (e.g. query=input,passage=context) to name the source columns"
_warned_tasks: set[str] = set()

DataSpec = str | Path | Sequence[str | Path] | Sequence[Sample]  # a file, folder or hub id, a list of them, or Samples


def resolve_samples(data: DataSpec, *, max_samples: int | None = None,
                    column_map: Mapping[str, str] | None = None) -> tuple[list[Sample], list[str]]:
    """(samples, the sources they came from): at most `max_samples`, taken in turn from each task."""
    if max_samples is not None and max_samples < 1:
        raise ConfigError(f"max_samples {max_samples} must be at least 1; leave it out (None) to use every sample")
    items = [data] if isinstance(data, (str, Path)) else list(data)
    if items and all(isinstance(item, Sample) for item in items):
        return spread_over_tasks(items, max_samples), []
    if not items or not all(isinstance(item, (str, Path)) for item in items):
        raise ConfigError("data must be a file, folder or hub id, a list of them, or a list of Samples")
    samples = [s for source in items for s in load_samples(source, column_map=column_map)]
    return spread_over_tasks(samples, max_samples), [str(source) for source in items]


def load_samples(source: str | Path, *, column_map: Mapping[str, str] | None = None, limit: int | None = None,
                 split: str = "train", name: str | None = None) -> list[Sample]:
    """Read `source` (a .jsonl/.json/.parquet file, a folder of them, or a hub id) as a list of `Sample`s.

    `column_map` renames source columns to the canonical LongBench names (context, input, answers, length,
    dataset, all_classes, _id); `limit` keeps the first rows; `split` and `name` (config) apply to hub ids.
    """
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit {limit} must be at least 1; omit it to load every row")
    column_map = dict(column_map or {})
    _check_column_map(column_map)
    path = Path(source).expanduser()
    if path.exists():
        files = _data_files(path)
        default_task = path.stem if path.is_file() else path.name
        builder = _SUFFIX_BUILDER[files[0].suffix]
        if builder == "parquet":
            for file in files:
                _check_parquet(file)
        if builder == "json" and sum(_prescan_json(file, column_map=column_map) for file in files) == 0:
            raise DataError(f"data set {path} has no rows; give a file with at least one LongBench-style row")
        rows = _load_local(builder, files)
        label = str(path)
    else:
        if _looks_like_path(str(source)):
            raise DataError(f"data file {source} does not exist; check the path (or give a hub id owner/name)")
        rows = _load_hub(str(source), split=split, name=name)
        default_task = str(source).rsplit("/", 1)[-1] if name is None else name
        label = str(source)
    samples: list[Sample] = []
    for index, row in enumerate(rows):
        if limit is not None and index >= limit:
            break
        samples.append(_to_sample(_rename(row, column_map), index=index, where=f"{label} row {index + 1}",
                                  default_task=default_task))
    if not samples:
        raise DataError(f"data set {label} has no rows; give a file with at least one LongBench-style row")
    _warn_duplicate_ids(samples, label)
    _warn_unknown_tasks(samples)
    return samples


def _warn_duplicate_ids(samples: list[Sample], label: str) -> None:
    """Say in one line when rows share an `_id`: profiles and reports name samples by it."""
    counts = Counter(sample.id for sample in samples)
    twice = [sample_id for sample_id, n in counts.items() if n > 1]
    if twice:
        shown = ", ".join(repr(i) for i in twice[:3]) + (f" and {len(twice) - 3} more" if len(twice) > 3 else "")
        logger.warning("data set %s: %d rows share an _id with another row (%s); reports and profiles name samples "
                       "by _id, so give each row its own", label, sum(counts[i] for i in twice), shown)


def _check_parquet(file: Path) -> None:
    """A Parquet file starts and ends with b"PAR1": refused in one line before `datasets` logs its own error."""
    try:
        with file.open("rb") as handle:
            head = handle.read(4)
            handle.seek(max(file.stat().st_size - 4, 0))
            tail = handle.read(4)
    except OSError as exc:
        raise DataError(f"data file {file} cannot be read ({exc.strerror}); check its permissions") from exc
    if head != b"PAR1" or tail != b"PAR1" or file.stat().st_size < 12:
        raise DataError(f"data file {file} is not a Parquet file (its PAR1 markers are missing: damaged, or another "
                        "format named .parquet); give a Parquet file, or rename a JSON-lines file to .jsonl")


def _warn_unknown_tasks(samples: list[Sample]) -> None:
    """Say once per task (per process) which metric and prompt a task without built-in ones falls back to."""
    # imported here: the metric table pulls in rouge_score/nltk, which the loader alone does not need
    from polykv_search.data.metrics import DEFAULT_METRIC, has_metric
    from polykv_search.data.prompts import has_template

    for sample in samples:
        task = sample.task
        if task in _warned_tasks:
            continue
        fallbacks = []
        if not has_metric(task):
            fallbacks.append(f"scored with {DEFAULT_METRIC}")
        if not sample.templated and not has_template(task):
            fallbacks.append("prompted with the generic read-then-answer template")
        if fallbacks:
            _warned_tasks.add(task)
            logger.warning("task %r is not a built-in task: %s (name a built-in task in the row's "
                           "`dataset`/`task`, or give kvpress-form rows with their own instructions)",
                           task, " and ".join(fallbacks),
                           extra={"polykv_hold": True})  # the command line says it when work starts: a refusal
                                                         # of another input (say, the model) stays one line


def _check_column_map(column_map: Mapping[str, str]) -> None:
    for src, dst in column_map.items():
        if dst not in CANONICAL_COLUMNS:
            raise ConfigError(f"column map {src}={dst}: {dst!r} is not a canonical column; "
                              f"map to one of {', '.join(CANONICAL_COLUMNS)}")


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.endswith(tuple(_SUFFIX_BUILDER)) or source.count("/") > 1


def _data_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix not in _SUFFIX_BUILDER:
            raise DataError(f"data file {path} has suffix {path.suffix!r}; use .jsonl, .json or .parquet")
        return [path]
    files = sorted(p for p in path.iterdir() if p.suffix in _SUFFIX_BUILDER and not p.name.startswith("."))
    if not files:
        raise DataError(f"folder {path} holds no .jsonl, .json or .parquet file; point at a data file")
    kinds = {_SUFFIX_BUILDER[p.suffix] for p in files}
    if len(kinds) > 1:
        raise DataError(f"folder {path} mixes JSON and Parquet files; point at one file or keep one format")
    return files


def _prescan_json(file: Path, *, column_map: Mapping[str, str]) -> int:
    """Parse JSON ourselves first: `datasets` reports a bad line without its number, and rows by position only."""
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        lineno = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise DataError(f"{file}:{lineno}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {column}); "
                        "save the file as UTF-8") from exc
    if file.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{file}:{exc.lineno}: malformed JSON ({exc.msg}, column {exc.colno}); "
                            "fix that line") from exc
        located: Iterable[tuple[int, str, Any]] = ((i, f"{file} row {i + 1}", row) for i, row in enumerate(rows))
    else:
        located = _json_lines(file, text)
    count = 0
    for index, where, row in located:
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}; "
                            "write one object per line")
        _to_sample(_rename(row, column_map), index=index, where=where, default_task=file.stem)
        count += 1
    return count


def _json_lines(file: Path, text: str) -> Iterable[tuple[int, str, Any]]:
    index = 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{file}:{lineno}: malformed JSON line ({exc.msg}, column {exc.colno}); "
                            "fix or delete that line") from exc
        yield index, f"{file}:{lineno} (row {index + 1})", row
        index += 1


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """datasets draws a progress bar on stderr for every file it reads: a library prints nothing, so it is off
    for the call and put back as the caller had it."""
    # imported here: datasets takes a second to load, and --help and validate never read data
    from datasets.utils.logging import disable_progress_bar, enable_progress_bar, is_progress_bar_enabled

    enabled = is_progress_bar_enabled()
    disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            enable_progress_bar()


def _load_local(builder: str, files: list[Path]) -> Any:
    from datasets import load_dataset  # imported here: a second to load, and --help and validate never read data

    try:
        with _quiet_datasets():
            return load_dataset(builder, data_files=[str(f) for f in files], split="train")
    except Exception as exc:  # datasets/pyarrow raise many types for inconsistent files
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"datasets could not read {files[0] if len(files) == 1 else files[0].parent}: {reason}; "
                        "make every row use the same column types") from exc


def _load_hub(source: str, *, split: str, name: str | None) -> Any:
    if not hub.offline_requested() and not hub.reachable():
        raise DataError(f"cannot load data set {source!r}: the Hugging Face hub ({hub.endpoint()}) cannot be "
                        "reached; pass a local .jsonl/.json/.parquet file, or set HF_HUB_OFFLINE=1 to read a copy "
                        "from the datasets cache")
    from datasets import load_dataset  # imported here: a second to load (see _load_local)

    try:
        with _quiet_datasets():
            return load_dataset(source, name, split=split)
    except Exception as exc:  # offline: ConnectionError; unknown id: DatasetNotFoundError; bad split: ValueError
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"cannot load data set {source!r} (split {split!r}) from the Hugging Face hub: {reason}; "
                        "pass a local .jsonl/.json/.parquet file, or check the id and network access") from exc


def _rename(row: Mapping[str, Any], column_map: Mapping[str, str]) -> dict[str, Any]:
    if not column_map:
        return dict(row)
    missing = [src for src in column_map if src not in row]
    if missing:
        raise DataError(f"column map names source column {missing[0]!r} but the rows have "
                        f"{', '.join(sorted(row))}; fix --column-map")
    renamed = {key: value for key, value in row.items() if key not in column_map}
    for src, dst in column_map.items():
        renamed[dst] = row[src]  # a mapped column wins over a same-named one already in the row
    return renamed


def _to_sample(row: Mapping[str, Any], *, index: int, where: str, default_task: str) -> Sample:
    row_id = row.get("_id")
    label = f"{where}" + (f" (_id {row_id})" if row_id is not None else "")
    templated = row.get("input") is None and row.get("question") is not None  # kvpress's form
    question_key = "question" if templated else "input"
    answers_key = "answers" if row.get("answers") is not None else "answer"
    for column, names in (("context", "'context'"), (question_key, "'input' (or kvpress's 'question')"),
                          (answers_key, "'answers' (or 'answer')")):
        if row.get(column) is None:
            raise DataError(f"{label} has no {names} column (it has {', '.join(sorted(row)) or 'none'}); "
                            f"{_MAP_HINT}")
    context, question, answers = row["context"], row[question_key], row[answers_key]
    if not isinstance(context, str) or not isinstance(question, str):
        bad = "context" if not isinstance(context, str) else question_key
        raise DataError(f"{label}: column {bad!r} is a {type(row[bad]).__name__}, not a string; "
                        f"{_MAP_HINT} to a text column")
    if answers_key == "answer" and isinstance(answers, str):
        answers = [answers]
    if isinstance(answers, str) or not isinstance(answers, (list, tuple)) or not answers \
            or not all(isinstance(a, str) for a in answers):
        raise DataError(f"{label}: column {answers_key!r} must be a non-empty list of strings, got {answers!r:.80}; "
                        "write it as [\"answer\", ...]")
    classes = row.get("all_classes")
    if classes is not None and (isinstance(classes, str) or not isinstance(classes, (list, tuple))
                                or not all(isinstance(c, str) for c in classes)):
        raise DataError(f"{label}: column 'all_classes' must be null or a list of strings, got {classes!r:.80}; "
                        "fix that row")
    prefix = row.get("answer_prefix")
    if prefix is not None and not isinstance(prefix, str):
        raise DataError(f"{label}: column 'answer_prefix' must be a string, got {prefix!r:.80}; fix that row")
    room = row.get("max_new_tokens")
    if room is not None and (not isinstance(room, int) or isinstance(room, bool) or room < 1):
        raise DataError(f"{label}: column 'max_new_tokens' must be a positive integer, got {room!r:.80}; "
                        "fix that row")
    length = row.get("length")
    if not isinstance(length, int) or isinstance(length, bool):
        length = len(context.split())
    task = row.get("dataset") or row.get("task") or default_task
    return Sample(
        id=str(row_id) if row_id is not None else f"{task}-{index}",
        task=str(task),
        context=context,
        question=question,
        answers=tuple(answers),
        all_classes=tuple(classes) if classes else None,
        length=length,
        answer_prefix=prefix,
        max_new_tokens=room,
        templated=templated,
    )
