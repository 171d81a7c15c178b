"""Whether the Hugging Face hub can be reached, asked once per process in a few seconds: a hub id then fails at
once when offline (or loads from the local cache), instead of after a minute of retries."""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from urllib.parse import urlparse

PROBE_SECONDS = 3.0


def endpoint() -> str:
    """The hub's address (HF_ENDPOINT, as huggingface_hub reads it)."""
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def offline_requested() -> bool:
    """HF_HUB_OFFLINE set: use the local cache only, as huggingface_hub does."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


@lru_cache(maxsize=4)
def _reachable(address: str) -> bool:
    parsed = urlparse(address)
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname or "", port), timeout=PROBE_SECONDS).close()
    except OSError:
        return False
    return True


def reachable() -> bool:
    """Whether a TCP connection to the hub opens within PROBE_SECONDS (False when HF_HUB_OFFLINE is set)."""
    return not offline_requested() and _reachable(endpoint())
