"""Per-sample checkpoints shared by long runs (calibrate, evaluate): a fingerprint of everything that decides their
content guards `--resume` (each checkpoint carries its digest too, and a checksum of its own content; where samples
are answered independently, also its own sample's digest, so a grown or edited data set reuses every unchanged
sample), and a lock file keeps a second run out of a folder that a live run is writing."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polykv_search.errors import ConfigError, ProfileError
from polykv_search.io import SealError, read_sealed_json, write_sealed_json

logger = logging.getLogger(__name__)

LOCK_NAME = ".polykv.lock"
_held: dict[Path, int] = {}  # folders this process holds, and how deeply (run holds its folder, then calibrate)


def samples_digest(samples: Sequence[Any]) -> str:
    """A hash of the `Sample`s' whole content (text, answers, prefixes, order): an edited data file is another run."""
    digest = hashlib.sha256()
    for sample in samples:
        digest.update(json.dumps(sample.to_row(), sort_keys=True, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def fingerprint_digest(fingerprint: dict[str, Any]) -> str:
    """The short digest each checkpoint records of the run fingerprint it was made under."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sample_digest(sample: Any) -> str:
    """A hash of one `Sample`'s whole content: what a per-sample checkpoint records of the sample it answers."""
    return samples_digest([sample])


PER_SAMPLE = "per-sample"  # the fingerprint's "checkpoints" value where each checkpoint names its own sample


def checkpoint_file(sample: Any, suffix: str) -> str:
    """The file name of `sample`'s checkpoint in a run whose checkpoints name their samples."""
    return f"sample-{sample_digest(sample)[:16]}{suffix}"


@dataclass(frozen=True)
class CheckpointRun:
    """Where a run's checkpoints are (`path`), what each records (`stamp`) and is checked against on --resume
    (`reusable`): the digest of the run's fingerprint and, where `per_sample`, the digest of the checkpoint's own
    sample, which also names its file, so a sample finds its checkpoint whatever its position. `legacy`: the digest
    of an older run of the same settings (its fingerprint held the whole sample set, its files are named by
    position) and, by sample digest, the files it left."""

    folder: Path
    digest: str
    suffix: str = ".json"
    per_sample: bool = False
    legacy: tuple[str, dict[str, str]] | None = None

    def path(self, index: int, sample: Any) -> Path:
        """The checkpoint file of `sample`, the run's `index`-th."""
        if not self.per_sample:
            return self.folder / f"sample-{index:05d}{self.suffix}"
        digest = sample_digest(sample)
        if self.legacy is not None and digest in self.legacy[1]:
            return self.folder / self.legacy[1][digest]
        return self.folder / checkpoint_file(sample, self.suffix)

    def say_reuse(self, samples: Sequence[Any]) -> None:
        """On --resume, say how many of `samples` have a checkpoint (the others are new, or edited since)."""
        if self.per_sample:
            held = sum(self.path(i, s).exists() for i, s in enumerate(samples))
            if held < len(samples):
                logger.info("--resume: %d of %d samples have a checkpoint in %s; the other %d (new, or edited "
                            "since) are computed", held, len(samples), self.folder, len(samples) - held)

    def stamp(self, sample: Any) -> dict[str, str]:
        """The fields a new checkpoint of `sample` records."""
        return {"run": self.digest, **({"sample": sample_digest(sample)} if self.per_sample else {})}

    def reusable(self, path: Path, stored: Mapping[str, Any], sample: Any) -> bool:
        """Whether the checkpoint at `path` (its recorded fields `stored`) answers `sample`: False when it was made
        for another sample (the caller redoes it); refused when another run made it."""
        recorded = stored.get("run")
        if self.legacy is not None and recorded == self.legacy[0]:
            return self.legacy[1].get(sample_digest(sample)) == path.name
        check_checkpoint(path, recorded, self.digest)
        return not self.per_sample or stored.get("sample") == sample_digest(sample)


def prepare_checkpoints(ckpt_dir: Path, fingerprint: dict[str, Any], *, resume: bool,
                        defaults: Mapping[str, Any] | None = None, samples: Sequence[Any] | None = None,
                        suffix: str = ".json",
                        sample_id_of: Callable[[Path], str | None] | None = None) -> CheckpointRun:
    """Keep `ckpt_dir` when resuming a run with the same fingerprint; otherwise start it afresh. Returns where the
    run's checkpoints are and what they record. `defaults`: keys (dotted paths, as `config.question_aware`) that a
    fingerprint may carry or leave out, with the value their absence means: a key added to the fingerprint later, or
    left out again, does not make the same run another. `samples`: the run's samples where each is answered on its
    own (evaluate; calibrate without --around or --shard): the fingerprint then leaves them out and each checkpoint
    names its own, so a resumed run over more samples, fewer, others in another order or a few edited reuses every
    checkpoint whose sample is unchanged. Without it the fingerprint holds the whole sample set. `sample_id_of`:
    reads the sample id a checkpoint of an older run recorded (None when unreadable), so that run's files are found
    again by sample."""
    run_file = ckpt_dir / "run.json"
    fingerprint = json.loads(json.dumps(fingerprint))  # compare as stored: tuples become lists
    if samples is not None:
        fingerprint["checkpoints"] = PER_SAMPLE
    if resume and run_file.exists():
        try:
            previous = read_sealed_json(run_file)
        except (OSError, ValueError) as exc:  # SealError, JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise ProfileError(f"--resume: {run_file} is damaged ({exc}); start over (calibrate and evaluate: "
                               "without --resume; run: --fresh)") from exc
        if samples is not None:
            return _per_sample_run(ckpt_dir, previous, fingerprint, defaults or {}, samples, suffix, sample_id_of)
        _same_settings(ckpt_dir, previous, fingerprint, defaults or {})
        return CheckpointRun(ckpt_dir, fingerprint_digest(previous), suffix)  # what the checkpoints record
    if resume:
        logger.debug("--resume: no checkpoints in %s, starting from the first sample", ckpt_dir)
    elif ckpt_dir.is_dir() and (held := len(list(ckpt_dir.glob("sample-*")))):
        logger.warning("starting over: the %d checkpoint%s of an earlier run in %s are removed (pass --resume to "
                       "continue from them instead)", held, "s" if held != 1 else "", ckpt_dir)
    if ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    write_sealed_json(run_file, fingerprint)
    return CheckpointRun(ckpt_dir, fingerprint_digest(fingerprint), suffix, per_sample=samples is not None)


def _same_settings(ckpt_dir: Path, previous: dict[str, Any], fingerprint: dict[str, Any],
                   defaults: Mapping[str, Any]) -> None:
    """Refuse, naming what changed, a resume under other settings than the checkpoints were made with."""
    if _without_defaults(previous, defaults) != _without_defaults(fingerprint, defaults):
        changed = changed_keys(previous, fingerprint)
        raise ProfileError(f"--resume: the checkpoints in {ckpt_dir} were made with a different "
                           f"{', '.join(changed)}; re-run with the same options, or start over (calibrate and "
                           f"evaluate: without --resume; run: --fresh, or delete {ckpt_dir} to redo that stage "
                           "alone)")


def _per_sample_run(ckpt_dir: Path, previous: dict[str, Any], fingerprint: dict[str, Any],
                    defaults: Mapping[str, Any], samples: Sequence[Any], suffix: str,
                    sample_id_of: Callable[[Path], str | None] | None) -> CheckpointRun:
    """A resume whose checkpoints are reused sample by sample. A run.json written before checkpoints named their
    samples holds the digest of its whole sample set and its files are named by position: where the samples its
    files name (by id, among `samples`) are exactly that set, its files are kept and run.json rewritten to say
    which sample each holds, so a run grown from an older one reuses them too."""
    legacy = previous.pop("legacy", None)
    if previous.get("checkpoints") == PER_SAMPLE:
        _same_settings(ckpt_dir, previous, fingerprint, defaults)
        kept = None if legacy is None else (str(legacy["run"]), dict(legacy["files"]))
        return CheckpointRun(ckpt_dir, fingerprint_digest(previous), suffix, per_sample=True, legacy=kept)
    older = {k: v for k, v in previous.items() if k != "samples"}
    _same_settings(ckpt_dir, {**older, "checkpoints": PER_SAMPLE}, fingerprint, defaults)
    files = _older_files(ckpt_dir, previous.get("samples"), samples, suffix, sample_id_of)
    if files is None:
        raise ProfileError(f"--resume: the checkpoints in {ckpt_dir} were made with a different samples (by an "
                           "older polykv-search, whose checkpoints are reused only where every sample they hold is "
                           "among those asked for now); re-run with the same data, or start over (calibrate and "
                           f"evaluate: without --resume; run: --fresh, or delete {ckpt_dir} to redo that stage "
                           "alone)")
    kept = (fingerprint_digest(previous), files)
    write_sealed_json(ckpt_dir / "run.json", {**fingerprint, "legacy": {"run": kept[0], "files": files}})
    logger.info("--resume: the %d checkpoints in %s were written before checkpoints named their samples; each is "
                "reused for its sample", len(files), ckpt_dir)
    return CheckpointRun(ckpt_dir, fingerprint_digest(fingerprint), suffix, per_sample=True, legacy=kept)


def _older_files(ckpt_dir: Path, set_digest: Any, samples: Sequence[Any], suffix: str,
                 sample_id_of: Callable[[Path], str | None] | None) -> dict[str, str] | None:
    """An older run's files by the digest of the sample each holds, or None when its sample set cannot be told: it
    is `samples` itself (files by position), or the samples its files name by id, in the files' order, whose digest
    is the run's (every file of a whole run, each id once among `samples`)."""
    if set_digest == samples_digest(samples):
        return {sample_digest(s): f"sample-{i:05d}{suffix}" for i, s in enumerate(samples)}
    names = sorted(p.name for p in ckpt_dir.glob(f"sample-[0-9][0-9][0-9][0-9][0-9]{suffix}"))
    if sample_id_of is None or not names or names != [f"sample-{i:05d}{suffix}" for i in range(len(names))]:
        return None
    by_id: dict[str, Any] = {}
    for sample in samples:
        by_id[str(sample.id)] = None if str(sample.id) in by_id else sample  # an id held twice tells nothing
    held = [by_id.get(sample_id_of(ckpt_dir / name) or "") for name in names]
    if any(s is None for s in held) or samples_digest(held) != set_digest:
        return None
    return {sample_digest(s): name for s, name in zip(held, names)}


def _without_defaults(fingerprint: dict[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `fingerprint` with each key of `defaults` removed where it holds its default value."""
    found = json.loads(json.dumps(fingerprint))
    for path, default in defaults.items():
        *parents, key = path.split(".")
        node = found
        for parent in parents:
            node = node.get(parent) if isinstance(node, dict) else None
        if isinstance(node, dict) and key in node and node[key] == default:
            del node[key]
    return found


def changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """The keys whose values differ, nested dicts named by path (config.budgets): what a refusal should name."""
    changed = []
    for key in sorted({*old, *new}):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            changed += changed_keys(a, b, f"{prefix}{key}.")
        else:
            changed.append(f"{prefix}{key}")
    return changed


def check_checkpoint(path: Path, recorded: str | None, expected: str) -> None:
    """Refuse a checkpoint made under another fingerprint than its folder's run.json (another writer's file)."""
    if recorded != expected:
        raise ProfileError(f"--resume: checkpoint {path} was made by another run than {path.parent / 'run.json'} "
                           "describes (its settings differ); start over (calibrate and evaluate: without --resume; "
                           "run: --fresh)")


def checkpoint_sha256(tensors_digest: str, meta: dict[str, str]) -> str:
    """A checkpoint's checksum: its content's digest (its tensors') and every metadata value but the checksum."""
    digest = hashlib.sha256(tensors_digest.encode())
    for key in sorted(k for k in meta if k != CHECKPOINT_CHECKSUM):
        digest.update(f"|{key}={meta[key]}".encode())
    return digest.hexdigest()


CHECKPOINT_CHECKSUM = "sha256"


def damaged_checkpoint(path: Path, sample: str, reason: str) -> ProfileError:
    """The refusal of a damaged checkpoint, naming its sample and how to go on."""
    return ProfileError(f"--resume: checkpoint {path} ({sample}) is damaged: {reason}; delete it to redo that "
                        "sample, or start over without --resume")


def read_sealed_checkpoint(path: Path, sample: str) -> dict[str, Any]:
    """A JSON checkpoint's content, checked against its checksum; refused naming `sample` when damaged."""
    try:
        return read_sealed_json(path)
    except SealError as exc:
        raise damaged_checkpoint(path, sample, str(exc)) from exc
    except (OSError, ValueError) as exc:
        raise damaged_checkpoint(path, sample, f"{type(exc).__name__}: {exc}") from exc


def check_out_dir(folder: str | Path, *, option: str = "--out") -> Path:
    """`folder` as an output folder: refused in one line when it is a file or cannot be created."""
    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{option} {path} is a file; give a folder (it will hold the checkpoints and results)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{option} {path}: cannot create the folder ({exc.strerror}); give a writable folder") \
            from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path} is not writable; give a writable folder")
    return path


@contextmanager
def folder_lock(folder: str | Path) -> Iterator[Path]:
    """Hold `folder` while a run writes in it: a second run on it is refused at once, with the owner's PID; a
    lock left by a process that is gone is taken over. Re-entrant within one process."""
    created = not Path(folder).exists()
    folder = check_out_dir(folder).resolve()
    if folder in _held:
        _held[folder] += 1
        try:
            yield folder
        finally:
            _held[folder] -= 1
        return
    lock = folder / LOCK_NAME
    _acquire(lock)
    _held[folder] = 1
    _remove_leftovers(folder)
    try:
        yield folder
    finally:
        del _held[folder]
        lock.unlink(missing_ok=True)
        if created and not any(folder.iterdir()):  # a run refused before writing leaves no empty folder behind
            folder.rmdir()


def _remove_leftovers(folder: Path) -> None:
    """Temporary files of a write a killed run never finished (`write_atomic` names them .<name>.*.tmp): with the
    lock held no live writer owns them."""
    for leftover in [*folder.glob(".*.tmp"), *(folder / "checkpoints").glob(".*.tmp")]:
        logger.info("removing %s, left by an interrupted write", leftover)
        leftover.unlink(missing_ok=True)


def _acquire(lock: Path) -> None:
    owner_text = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()})
    for _ in range(5):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            owner = _owner(lock)
            if owner is not None and _alive(owner):
                started = time.strftime("%H:%M:%S", time.localtime(owner.get("started", 0)))
                raise ConfigError(f"{lock.parent} is in use by another polykv-search run (PID {owner['pid']} on "
                                  f"{owner['host']}, since {started}); wait for it to finish, or give another "
                                  f"--out (delete {lock} only if no run is using the folder)") from None
            logger.warning("taking over %s: the run that held it (PID %s) is gone", lock,
                           owner.get("pid") if owner else "unknown")
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(owner_text)
        return
    raise ConfigError(f"could not take the lock {lock}; another run keeps taking it: give another --out")


def _owner(lock: Path) -> dict[str, Any] | None:
    try:
        owner = json.loads(lock.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        # killed between creating and writing the lock: stale unless it is brand new (its writer is still at it)
        try:
            young = time.time() - lock.stat().st_mtime < 2
        except OSError:
            return None
        return {"pid": "unknown", "host": socket.gethostname(), "started": time.time()} if young else None
    if not isinstance(owner, dict) or not isinstance(owner.get("pid"), int):
        return None
    return owner


def _alive(owner: dict[str, Any]) -> bool:
    if owner.get("host") != socket.gethostname():
        return True  # another machine's process cannot be checked from here: assume it runs
    pid = owner["pid"]
    if pid == "unknown":
        return True
    if pid == os.getpid():
        return False  # this process holds no such lock (folder_lock knows its own): a reused PID
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's live process
    started = _process_start(pid)
    return started is None or started <= float(owner.get("started", 0)) + 1  # a later process reused the PID


def _process_start(pid: int) -> float | None:
    """When process `pid` started (Linux /proc), or None where that cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return None
