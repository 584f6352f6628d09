"""The transport over torch.distributed: asynchronous p2p between the ranks of a replica, the
signal broadcast on the replica's pipeline group, gradient sums on the replica groups.

Messages between two stages held by the same rank (torch's two-stages-per-rank schedules) stay
in memory. Messages between a pair of ranks go over one `p2p.Link` per peer, which agrees each
key's shapes once (the header travels with the first message of a key; later ones are posted
straight into buffers of the agreed shapes) and are matched in the order they are posted: the
schedules issue them in the same (micro-batch, stage) order on both sides (the ordering invariant,
`distributed/p2p.py`).

Sends are asynchronous: `send` posts them and returns, so they overlap the next micro-batch's
compute; `flush` (end of a mini-batch) waits for them. At most `max_sends_in_flight` messages
are pending: past the cap, `send` first waits for the oldest (whose receive the peer posts without
waiting on this rank), which bounds the memory held by messages in flight.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable
from typing import Any

import torch
import torch.distributed as dist

from ..runtime.layout import Layout
from ..runtime.transport import Handle, InProcessTransport, Tensors, Transport
from . import p2p
from .mesh import Mesh


class DistributedTransport(Transport):
    def __init__(self, mesh: Mesh, layout: Layout, device: torch.device,
                 max_sends_in_flight: int = 4) -> None:
        if max_sends_in_flight < 1:
            raise ValueError(f"max_sends_in_flight must be >= 1, got {max_sends_in_flight}")
        self.mesh = mesh
        self.layout = layout
        self.device = device
        self.max_sends_in_flight = max_sends_in_flight
        self.peak_sends_in_flight = 0  # the most messages ever pending at once (tests)
        self._sends: deque[list] = deque()  # each message's works, oldest first
        self._links: dict[int, p2p.Link] = {}
        self._local = InProcessTransport()  # stages of this rank talking to each other

    def _rank(self, stage: int) -> int:
        return self.mesh.rank_at(self.layout.position_of(stage))

    def _link(self, peer: int) -> p2p.Link:
        if peer not in self._links:
            self._links[peer] = p2p.Link(peer, self.device)
        return self._links[peer]

    def send(self, tensors: Tensors, src: int, dst: int, key: Hashable = None) -> None:
        peer = self._rank(dst)
        if peer == self.mesh.rank:
            self._local.send(tensors, src, dst, key)
            return
        while len(self._sends) >= self.max_sends_in_flight:
            p2p.wait_all(self._sends.popleft())
        # The stage pair is part of the key: two pairs of stages may share a pair of ranks.
        self._sends.append(self._link(peer).isend(tensors, None if key is None
                                                  else (src, dst, key)))
        self.peak_sends_in_flight = max(self.peak_sends_in_flight, len(self._sends))

    def recv(self, src: int, dst: int, key: Hashable = None) -> Tensors:
        peer = self._rank(src)
        if peer == self.mesh.rank:
            return self._local.recv(src, dst, key)
        return self._link(peer).recv(None if key is None else (src, dst, key))

    def broadcast(self, packet: torch.Tensor, src: int) -> Handle:
        return dist.broadcast(packet, self._rank(src), group=self.mesh.pipeline_group,
                              async_op=True)

    def all_reduce_replicas(self, tensors: list[torch.Tensor]) -> None:
        if self.mesh.dp == 1 or not tensors:
            return
        # One collective for all of them (flattened; same dtype).
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=self.mesh.replica_group)
        offset = 0
        for t in tensors:
            n = t.numel()
            t.copy_(flat[offset:offset + n].view_as(t))
            offset += n

    def all_reduce(self, tensor: torch.Tensor) -> None:
        dist.all_reduce(tensor)

    def all_gather_object(self, obj: Any) -> list[Any]:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, obj)
        return out

    def flush(self) -> None:
        while self._sends:
            p2p.wait_all(self._sends.popleft())
        for link in self._links.values():
            link.check()  # tags received on the GPU (a no-op on the CPU: checked on arrival)

    def in_flight(self) -> dict[str, int]:
        return {"sends": len(self._sends), **self._local.in_flight()}

    def counters(self) -> dict[str, int]:
        """Messages and headers sent and received over every link (headers: one per key and
        direction, plus one per message without a key)."""
        out = dict.fromkeys(("messages_sent", "messages_received", "headers_sent",
                             "headers_received"), 0)
        for link in self._links.values():
            for k, v in link.counters().items():
                out[k] += v
        return out
