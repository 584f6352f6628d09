"""How the stages of one pipeline replica exchange tensors: the one interface the schedules use.

Stages are addressed by their pipeline index, never by rank. `send`/`recv` move a stage's outputs
(activation and tangent bundle, or an input gradient) to the next or previous stage; `broadcast`
hands a flat packet from one stage to every stage of the replica (the output signal);
`all_reduce_replicas` sums tensors over the data-parallel replicas of this rank's stages.

Two implementations: `InProcessTransport` (every stage in this process: messages are queued in
memory) and `distributed.transport.DistributedTransport` (torch.distributed: asynchronous p2p
with shapes agreed once per message key, collectives on the mesh's groups). The schedules cannot
tell them apart, so one process, torchrun with one rank and P ranks run the same schedule code.

Every message carries a *key* (`message_key`): what determines its shapes (kind, micro-batch rows),
computed by sender and receiver from the same schedule state. Across ranks it lets the shapes
travel once per key (`distributed/p2p.py`); in one process the queue checks that the receiver
asked for the key that was sent, so a schedule that mixes messages up fails here too.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

import torch

Tensors = list[torch.Tensor | None]


class Handle(Protocol):
    def wait(self) -> Any: ...


class _Done:
    """A handle for work that completed synchronously."""

    def wait(self) -> None:
        return None


class InFlightError(RuntimeError):
    """A schedule ended a mini-batch with work still pending: a schedule bug, never silent."""


class MessageMismatch(RuntimeError):
    """A receiver expected another message (key, shapes or order) than the one sent: a
    schedule bug, never silent."""


def message_key(kind: str, *parts: Hashable) -> tuple:
    """The key of a message: its kind (e.g. `fwd/grape`) and what fixes its shapes beyond
    the stage pair (a micro-batch's start, size and mini-batch total; an evaluation chunk's
    rows). Keys must be equal on the sending and the receiving rank."""
    return (kind, *parts)


class Transport:
    """The interface; see the module docstring. All calls are made by every rank of a replica
    in the same order for the same stages (the schedules guarantee it)."""

    # Every stage in this process: a broadcast has nothing to move (schedules skip packing).
    local_only = False

    def send(self, tensors: Tensors, src: int, dst: int, key: Hashable = None) -> None:
        """Start moving `tensors` from stage `src` to stage `dst` (asynchronous) under `key`
        (`message_key`: equal keys, equal shapes; None: shapes described every time)."""
        raise NotImplementedError

    def recv(self, src: int, dst: int, key: Hashable = None) -> Tensors:
        """What stage `src` sent to stage `dst` under `key` (blocks until it arrives)."""
        raise NotImplementedError

    def broadcast(self, packet: torch.Tensor, src: int) -> Handle:
        """Stage `src`'s `packet` to every stage of the replica. The rank holding `src` passes
        the packet; the others pass a buffer of the same size and dtype, filled once the
        returned handle's `wait()` returns."""
        raise NotImplementedError

    def all_reduce_replicas(self, tensors: list[torch.Tensor]) -> None:
        """Sum `tensors` in place over the data-parallel replicas of this rank's stages."""
        raise NotImplementedError

    def all_reduce(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` in place over every rank."""
        raise NotImplementedError

    def all_gather_object(self, obj: Any) -> list[Any]:
        """`obj` from every rank, in rank order (small objects: scalars, statistics)."""
        raise NotImplementedError

    def flush(self) -> None:
        """Wait until this rank's sends have completed."""
        raise NotImplementedError

    def in_flight(self) -> dict[str, int]:
        """Pending work by kind (sends not waited on, messages queued and not received)."""
        raise NotImplementedError

    # -- stages on CUDA streams (one process; no-ops elsewhere) --------------------------------

    def stage(self, s: int) -> AbstractContextManager[Any]:
        """The context in which stage `s`'s work is issued (its CUDA stream, if it has one)."""
        return nullcontext()

    def fork(self) -> None:
        """Start of a mini-batch: stage work may use what the caller's stream made so far."""

    def join(self) -> None:
        """End of a mini-batch: the caller's stream waits for every stage's work."""

    def share(self, tensors: list[torch.Tensor], src: int, dst: int) -> None:
        """Stage `dst` is about to use `tensors` that stage `src` made (without a send)."""

    def hold(self, held: Callable[[], list[Any]]) -> None:
        """Keep what `held()` returns referenced until `join` (stashes dropped on another
        stream); called only by transports that need it, so others pay nothing."""

    def check_idle(self, where: str) -> None:
        pending = {k: v for k, v in self.in_flight().items() if v}
        if pending:
            raise InFlightError(f"{where}: transport still has {pending} in flight")


class InProcessTransport(Transport):
    """Every stage in this process: a message is a list of tensors in a queue per stage pair
    (no copy); a broadcast is the packet itself; one replica, so reductions do nothing."""

    local_only = True

    def __init__(self) -> None:
        self._queues: dict[tuple[int, int], deque[tuple[Hashable, Tensors]]] = {}

    def send(self, tensors: Tensors, src: int, dst: int, key: Hashable = None) -> None:
        self._queues.setdefault((src, dst), deque()).append((key, tensors))

    def recv(self, src: int, dst: int, key: Hashable = None) -> Tensors:
        queue = self._queues.get((src, dst))
        if not queue:
            raise InFlightError(f"stage {dst} receives from stage {src} before it sent: the "
                                "schedule runs stages out of order")
        sent, tensors = queue.popleft()
        if sent is not None and key is not None and sent != key:
            raise MessageMismatch(f"stage {dst} expects {key!r} from stage {src}, which sent "
                                  f"{sent!r}: the schedule mixes messages up")
        return tensors

    def broadcast(self, packet: torch.Tensor, src: int) -> Handle:
        return _Done()

    def all_reduce_replicas(self, tensors: list[torch.Tensor]) -> None:
        pass

    def all_reduce(self, tensor: torch.Tensor) -> None:
        pass

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def flush(self) -> None:
        pass

    def in_flight(self) -> dict[str, int]:
        return {"queued": sum(len(q) for q in self._queues.values())}
