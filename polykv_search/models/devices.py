"""Which device a model loads on, and the one line that says so. No torch at import: the command line's --help
reads the choices."""

from __future__ import annotations

from typing import Literal

from polykv_search.errors import ConfigError

DeviceName = Literal["best", "cpu", "cuda", "auto"]
DEVICES: tuple[str, ...] = ("best", "cpu", "cuda", "auto")
DEFAULT_DEVICE = "best"  # a visible GPU when there is one: a user with a GPU should not have to ask for it


def resolve_device(device: str = DEFAULT_DEVICE) -> str:
    """The device a model loads on: `best` (the default) is cuda when torch sees a GPU, else cpu; `cuda` refuses
    when none is visible; `auto` is accelerate's device map across the visible GPUs (cpu when there is none)."""
    if device not in DEVICES:
        raise ConfigError(f"--device {device!r} is not one of {', '.join(DEVICES)}")
    import torch  # imported here: --help and the plan commands import this module without torch

    visible = torch.cuda.is_available()
    if device == "best":
        return "cuda" if visible else "cpu"
    if device in ("cuda", "auto") and not visible:
        if device == "cuda":
            raise ConfigError("--device cuda was asked but no CUDA GPU is visible; use --device cpu (or best)")
        return "cpu"
    return device


def describe_device(device: str) -> str:
    """One line for a resolved device: 'cuda (NVIDIA H100 80GB HBM3)', 'cpu (no GPU visible)'."""
    import torch  # imported here: --help and the plan commands import this module without torch

    visible = torch.cuda.is_available()
    if device == "cpu":
        return "cpu (a GPU is visible; asked for the CPU)" if visible else "cpu (no GPU visible)"
    names = [torch.cuda.get_device_name(k) for k in range(torch.cuda.device_count())]
    if device == "auto":
        return f"auto (accelerate's device map over {len(names)} GPU{'s' if len(names) != 1 else ''}: " \
               f"{', '.join(names)})"
    return f"cuda ({names[torch.cuda.current_device()]})"
