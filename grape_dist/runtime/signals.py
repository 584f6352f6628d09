"""The broadcast packet: a mini-batch's (or one micro-batch's) output signals in one flat tensor.

Layout, float64 (exact for float32 and float64 values): [summed loss, #correct], then for each
micro-batch its error (size x positions x width) and its output tangents (K x m x
[positions x] width, GrAPE only; `SignalSpec`). Every stage
knows the packet's size in advance from the micro-batch sizes and its rule's
`output_tangent_shape` (or the `tangent_shape` it is given: the alignment probe's one stream
per feedback point), so receivers preallocate it and no header travels.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..rules import MicroBatch, OutputSignal, SignalSpec, StageRule
from ..rules.base import one_hot


class SignalCodec:
    def __init__(self, rule: StageRule, spec: SignalSpec, device: torch.device,
                 tangent_shape: Callable[[MicroBatch], tuple[int, int] | None] | None = None
                 ) -> None:
        self.rule = rule  # any of this rank's rules of the kind being run: they agree on shapes
        self.spec = spec
        self.device = device
        # (streams, rows) of a micro-batch's output tangents; default: the rule's.
        self.tangent_shape = tangent_shape or rule.output_tangent_shape

    def _error_size(self, mb: MicroBatch) -> int:
        return mb.size * self.spec.positions * self.spec.signal_width

    def _tangent_size(self, mb: MicroBatch) -> int:
        km = self.tangent_shape(mb)
        return km[0] * km[1] * math.prod(self.spec.tangent_tail()) if km else 0

    def size(self, mbs: list[MicroBatch]) -> int:
        return 2 + sum(self._error_size(mb) + self._tangent_size(mb) for mb in mbs)

    def empty(self, mbs: list[MicroBatch]) -> torch.Tensor:
        return torch.empty(self.size(mbs), dtype=torch.float64, device=self.device)

    def pack(self, stats: torch.Tensor, signals: list[OutputSignal]) -> torch.Tensor:
        parts = [stats.to(torch.float64)]
        for s in signals:
            parts.append(s.error.reshape(-1).double())
            if s.tangents is not None:
                parts.append(s.tangents.reshape(-1).double())
        return torch.cat(parts)

    def unpack(self, packet: torch.Tensor, mbs: list[MicroBatch], labels: torch.Tensor,
               offset: int) -> tuple[torch.Tensor, list[OutputSignal]]:
        """(stats, signals); `labels` are this replica's, whose first row is global row
        `offset` (DRTP's targets come from the rank's own copy of the labels)."""
        w, c = self.spec.signal_width, self.spec.num_classes
        dtype = torch.get_default_dtype()
        pos, signals = 2, []
        for mb in mbs:
            n = self._error_size(mb)
            e = packet[pos:pos + n].view(-1, w).to(dtype)
            pos += n
            km = self.tangent_shape(mb)
            t = None
            if km:
                n = self._tangent_size(mb)
                t = packet[pos:pos + n].view(*km, *self.spec.tangent_tail()).to(dtype)
                pos += n
            # A rank without the labels holds a placeholder (data/held.py): no targets, which
            # only DRTP reads, and it holds the labels.
            rows = labels[mb.start - offset:mb.start - offset + mb.size].reshape(-1).long()
            signals.append(OutputSignal(e, one_hot(rows, c, dtype), t, mb.total))
        if pos != packet.numel():
            raise RuntimeError(f"signal packet of {packet.numel()} values, {pos} expected")
        return packet[:2].clone(), signals
