"""The progress callback every long stage takes: the library reports how far it has come, the caller shows it."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[str, int, int, str], None]  # (stage, done, total, note); total 0: a step with no count
