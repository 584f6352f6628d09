"""Dropout whose masks follow the trajectory: the same on one process and on P pipeline ranks,
whatever the micro-batching or the data-parallel split (DESIGN section 3: random draws are keyed
by what they are for, never by rank).

A `KeyedDropout` draws the mask of a whole mini-batch (`total` rows) at once, from the stream
keyed by (seed, "dropout", stream, step, block, position in the block), and applies the rows
[start, start + size) of the micro-batch it is given. The schedule says which rows those are
with `dropout_rows(...)` around each stage's forward (`runtime/schedules.py`); the seed and block
index are given to the module when its block is materialised (`BlockModel.materialize`). The
mini-batch's mask is kept until the next step, so every micro-batch, and a tangent pushed
through the same layer (`rules/tangents.py`), sees the mask its rows had in the primal.

Outside any `dropout_rows` context (a model called directly) it is ordinary dropout on the global
random stream; in eval mode it is the identity.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn

from ..rng import keyed_generator


@dataclass(frozen=True)
class DropoutRows:
    """Which rows of which mini-batch a forward runs on.

    `stream` says what the forward is for (the rule's name, "calibration", "probe"), so that a
    calibration step and the training step that shares its step counter draw different masks;
    `step` numbers the mini-batch; rows [start, start + size) of its `total` are given."""

    step: int
    start: int
    size: int
    total: int
    stream: str = "train"


_ROWS: ContextVar[DropoutRows | None] = ContextVar("grape_dropout_rows", default=None)


@contextmanager
def dropout_rows(step: int, start: int, size: int, total: int,
                 stream: str = "train") -> Iterator[DropoutRows]:
    """Within this context every `KeyedDropout` takes rows [start, start + size) of the mask of
    mini-batch `step` (`total` rows) of `stream`."""
    if not (0 <= start and 0 <= size and start + size <= total):
        raise ValueError(f"rows [{start}, {start + size}) do not fit a mini-batch of {total}")
    rows = DropoutRows(step, start, size, total, stream)
    token = _ROWS.set(rows)
    try:
        yield rows
    finally:
        _ROWS.reset(token)


def current_rows() -> DropoutRows | None:
    """The innermost `dropout_rows` context, None outside any."""
    return _ROWS.get()


class KeyedDropout(nn.Module):
    """Dropout with probability `p` whose mask is keyed by (seed, step, block, position) and by
    global row (module docstring). `key` = (seed, block index, position among the block's
    KeyedDropouts) is set by `assign_dropout_keys` when the block is materialised."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.p = p
        self.key: tuple[int, int, int] | None = None
        # (what the mask was drawn for, the whole mini-batch's scaled mask): one draw per step.
        self._cache: tuple[tuple, torch.Tensor] | None = None

    def mask(self, x: torch.Tensor) -> torch.Tensor | None:
        """The mask for the rows of `x`, already scaled (entries 0 or 1 / (1 - p)); None when
        dropout is the identity (eval mode, p = 0). Within one `dropout_rows` context, calling
        it again gives the same mask."""
        if not self.training or self.p == 0:
            return None
        keep, scale = 1.0 - self.p, 1.0 / (1.0 - self.p)
        rows = _ROWS.get()
        if rows is None or (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            # A direct call: plain dropout on the global stream. Inside a CUDA graph capture a
            # keyed host draw would be replayed unchanged; the default generator advances.
            return torch.empty_like(x).bernoulli_(keep).mul_(scale)
        if len(x) != rows.size:
            raise ValueError(f"dropout got {len(x)} rows, the context says {rows.size}")
        if self.key is None:
            raise RuntimeError("KeyedDropout has no key: build its block with "
                               "BlockModel.materialize (or call assign_dropout_keys)")
        return self._full_mask(rows, x)[rows.start:rows.start + rows.size]

    def _full_mask(self, rows: DropoutRows, x: torch.Tensor) -> torch.Tensor:
        what = (rows.stream, rows.step, rows.total, tuple(x.shape[1:]), x.device, x.dtype)
        if self._cache is None or self._cache[0] != what:
            seed, block, position = self.key  # type: ignore[misc]
            gen = keyed_generator(seed, "dropout", rows.stream, rows.step, block, position)
            # Drawn on the CPU (the reference stream): the same mask on any device.
            kept = torch.rand((rows.total, *x.shape[1:]), generator=gen) < 1.0 - self.p
            mask = kept.to(device=x.device, dtype=x.dtype) * (1.0 / (1.0 - self.p))
            self._cache = (what, mask)
        return self._cache[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mask(x)
        return x if m is None else x * m

    def extra_repr(self) -> str:
        return f"p={self.p}, key={self.key}"


def assign_dropout_keys(block: nn.Module, seed: int, index: int) -> None:
    """Key every KeyedDropout of block `index` by (seed, index, its position in the block)."""
    drops = [m for m in block.modules() if isinstance(m, KeyedDropout)]
    for position, m in enumerate(drops):
        m.key, m._cache = (seed, index, position), None
