"""The profile header read as types: what a profile was calibrated from (model, policies, grid, data, samples), so
that no stage reads the stored JSON by key. The JSON stays the file's form (`Profile.header`); `Profile.meta` is
its typed reading, tolerant of fields that older profiles lack."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from polykv_search.models.info import ModelInfo


@dataclass(frozen=True)
class ProfileSample:
    """One calibration sample of a profile row: its id (None in profiles that did not record it), task and
    prompt lengths in tokens."""

    id: str | None
    task: str = ""
    context_tokens: int | None = None
    suffix_tokens: int | None = None
    truncated: bool | None = None

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> ProfileSample:
        return cls(id=row.get("id"), task=str(row.get("task", "")), context_tokens=row.get("context_tokens"),
                   suffix_tokens=row.get("suffix_tokens"), truncated=row.get("truncated"))

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "task": self.task, "context_tokens": self.context_tokens,
                "suffix_tokens": self.suffix_tokens, "truncated": self.truncated}


@dataclass(frozen=True)
class DataSource:
    """A calibration data source: a file's path and its sha256, or a hub id ("hub")."""

    source: str
    sha256: str = "hub"


@dataclass(frozen=True)
class ProfileHeader:
    """What a profile was calibrated from and how; `options` are calibrate's switches as stored."""

    model: ModelInfo
    policies: tuple[str, ...]
    budgets: tuple[int, ...]
    samples: tuple[ProfileSample, ...]
    format_version: int = 1
    created: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    signals: tuple[str, ...] = ()
    data: tuple[DataSource, ...] = ()
    around: tuple[Mapping[str, Any], ...] = ()  # `calibrate --around` backgrounds (calibration/around.py)
    shard: Mapping[str, Any] | None = None  # the shard record of a partial profile (calibration/shards.py)
    merged_from: tuple[Mapping[str, Any], ...] = ()

    @classmethod
    def from_dict(cls, header: Mapping[str, Any]) -> ProfileHeader:
        samples = header.get("samples")
        return cls(model=ModelInfo.from_dict(header["model"]),
                   policies=tuple(p["name"] for p in header["policies"]),
                   budgets=tuple(int(b) for b in header["budgets"]),
                   samples=tuple(ProfileSample.from_dict(s) for s in samples) if isinstance(samples, list) else (),
                   format_version=int(header.get("format_version", 1)), created=header.get("created"),
                   options=dict(header.get("options") or {}), signals=tuple(header.get("signals") or ()),
                   data=tuple(DataSource(str(e["source"]), str(e.get("sha256", "hub")))
                              for e in header.get("data") or ()),
                   around=tuple(header.get("around") or ()), shard=header.get("shard"),
                   merged_from=tuple(header.get("merged_from") or ()))

    @property
    def question_aware(self) -> bool:
        """Whether the samples were prompted with the question compressed with the context (calibrate
        --question-aware); profiles that do not record it were not."""
        return bool(self.options.get("question_aware", False))

    @property
    def sample_ids(self) -> list[str | None]:
        return [s.id for s in self.samples]

    @property
    def data_sources(self) -> list[str]:
        """Where the calibration samples came from (empty when the profile did not record it)."""
        return [d.source for d in self.data]
