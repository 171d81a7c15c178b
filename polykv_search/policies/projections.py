"""Let kvpress scorers reuse the query projection the model already computed in its prefill.

ExpectedAttention projects every context position's hidden state through `q_proj` again to estimate the
queries' statistics, and SnapKV/TOVA project the observation window: the same product the attention layer has
just computed (a whole q_proj over the context, 12 ms a layer at 2.5k tokens on SmolLM2, two CPU threads). While
`keeping_query_projections` is active each attention module remembers its last `q_proj` input and output;
`reused_query_projection` then stands a stand-in for `q_proj` while the scorers run, which answers a call on rows
of that same input with the matching rows of the output and computes anything else as usual. kvpress's scorers
run unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

STASH_ATTR = "polykv_q_proj_io"  # (input, output) of the module's last q_proj call


class ProjectionRows(torch.nn.Module):
    """Answers `proj(x)` from a known `output = proj(source)` when x is a slice of source's rows (dim 1)."""

    def __init__(self, proj: torch.nn.Module, source: torch.Tensor, output: torch.Tensor) -> None:
        super().__init__()
        self.proj, self.source, self.output = proj, source, output

    def rows_of_source(self, x: torch.Tensor) -> tuple[int, int] | None:
        src = self.source
        if (x.dim() != 3 or x.dtype != src.dtype or x.device != src.device or x.shape[0] != src.shape[0]
                or x.shape[2] != src.shape[2] or x.stride() != src.stride()
                or x.untyped_storage().data_ptr() != src.untyped_storage().data_ptr()):
            return None
        offset = x.storage_offset() - src.storage_offset()
        row_stride = src.stride(1)
        if offset < 0 or offset % row_stride:
            return None
        start = offset // row_stride
        stop = start + x.shape[1]
        return (start, stop) if stop <= src.shape[1] else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = self.rows_of_source(x)
        if rows is None:
            return self.proj(x)
        return self.output[:, rows[0]:rows[1]]


def _stash_hook(attention: torch.nn.Module):
    def hook(proj: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        # Holding the input keeps its storage alive, so a later tensor can never reuse its address.
        attention.__dict__[STASH_ATTR] = (args[0], output) if args and torch.is_tensor(args[0]) else None
    return hook


@contextmanager
def keeping_query_projections(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """While active, every attention module in `modules` with a `q_proj` keeps its last projection's input and
    output (one layer's (T, H * D) queries; dropped on exit)."""
    handles = []
    try:
        for module in modules:
            proj = getattr(module, "q_proj", None)
            if isinstance(proj, torch.nn.Module):
                handles.append(proj.register_forward_hook(_stash_hook(module)))
        yield
    finally:
        for handle in handles:
            handle.remove()
        for module in modules:
            module.__dict__.pop(STASH_ATTR, None)


@contextmanager
def reused_query_projection(module: torch.nn.Module, hidden: torch.Tensor) -> Iterator[None]:
    """Within the block, `module.q_proj` on rows of `hidden` returns rows of the model's own projection of
    `hidden`, if the model projected exactly this tensor; otherwise the block runs as is."""
    stash = module.__dict__.pop(STASH_ATTR, None)
    proj = getattr(module, "q_proj", None)
    if stash is None or stash[0] is not hidden or not isinstance(proj, torch.nn.Module):
        yield
        return
    module.q_proj = ProjectionRows(proj, stash[0], stash[1])
    try:
        yield
    finally:
        module.q_proj = proj
