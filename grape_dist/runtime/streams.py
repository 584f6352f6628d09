"""Layer-parallel stages on one GPU: every stage issues its work on its own CUDA stream.

One process holding several stages (`pipeline.stage_streams`) runs the same schedules as ever;
only the transport differs. Stage s's forward, local backward, B step and optimiser step are all
issued on stream s, so the stages of the direct rules update concurrently once the signal is
known, and stage s's forward of micro-batch j + 1 overlaps with stage s + 1's work on
micro-batch j. Autograd runs each backward op on the stream of its forward op, which is why the
forward runs on the stage's stream too, not only the update.

Synchronisation, the usual CUDA rules:
- A tensor handed from stage a to stage b (`send`/`recv`, or `share` for the broadcast signal)
  carries an event recorded on a's stream after it was made; b's stream waits on the event, and
  the tensor is `record_stream`-ed on b's stream so the caching allocator does not give its
  memory out again while b may still read it.
- `fork` makes every stage stream wait on the caller's stream (the batch, the statistics buffer
  and the weights as evaluation left them); `join` makes the caller's stream wait on every
  stage stream, so what follows (evaluation, calibration, reading the statistics) sees the
  updated weights.
- The stages' stashes (made on one stream, dropped in an update on another) stay referenced
  until `join` (`StageRule.held_tensors`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable
from typing import Any

import torch

from .transport import InFlightError, InProcessTransport, Tensors


class StreamTransport(InProcessTransport):
    """In-process messages plus one CUDA stream per stage."""

    def __init__(self, num_stages: int, device: torch.device) -> None:
        super().__init__()
        if device.type != "cuda":
            raise ValueError(f"stage streams need a CUDA device, got {device}")
        self.device = device
        self.streams = [torch.cuda.Stream(device) for _ in range(num_stages)]
        self._events: dict[tuple[int, int], deque[torch.cuda.Event]] = {}
        self._held: list[Any] = []

    def stage(self, s: int):
        return torch.cuda.stream(self.streams[s])

    def _record(self, s: int) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(self.streams[s])
        return event

    def send(self, tensors: Tensors, src: int, dst: int, key: Hashable = None) -> None:
        super().send(tensors, src, dst, key)
        self._events.setdefault((src, dst), deque()).append(self._record(src))

    def recv(self, src: int, dst: int, key: Hashable = None) -> Tensors:
        tensors = super().recv(src, dst, key)
        event = self._events[(src, dst)].popleft()
        self._consume([t for t in tensors if t is not None], event, dst)
        return tensors

    def share(self, tensors: list[torch.Tensor], src: int, dst: int) -> None:
        if src != dst:
            self._consume(tensors, self._record(src), dst)

    def _consume(self, tensors: list[torch.Tensor], event: torch.cuda.Event, dst: int) -> None:
        stream = self.streams[dst]
        stream.wait_event(event)
        if torch.cuda.is_current_stream_capturing():
            # Under CUDA graph capture the graph's own pool and the stashes held until `join`
            # keep these alive; the allocator does not take stream uses during capture.
            return
        for t in tensors:
            if t.is_cuda:
                t.record_stream(stream)

    def fork(self) -> None:
        current = torch.cuda.current_stream(self.device)
        for stream in self.streams:
            stream.wait_stream(current)

    def hold(self, held: Callable[[], list[Any]]) -> None:
        self._held.extend(held())

    def join(self) -> None:
        current = torch.cuda.current_stream(self.device)
        for stream in self.streams:
            current.wait_stream(stream)
        self._held = []

    def in_flight(self) -> dict[str, int]:
        out = super().in_flight()
        out["events"] = sum(len(q) for q in self._events.values())
        return out

    def check_idle(self, where: str) -> None:
        if self._held:
            raise InFlightError(f"{where}: {len(self._held)} stashes held past the join")
        super().check_idle(where)
