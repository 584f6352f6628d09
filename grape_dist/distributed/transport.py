"""The transport over torch.distributed: batched p2p between the ranks of a replica, the signal
broadcast on the replica's pipeline group, gradient sums on the replica groups.

Messages between two stages held by the same rank (torch's two-stages-per-rank schedules) stay
in memory. Messages between a pair of ranks are matched in the order they are posted: the
schedules issue them in the same (micro-batch, stage) order on both sides.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ..runtime.layout import Layout
from ..runtime.transport import Handle, InProcessTransport, Tensors, Transport
from . import p2p
from .mesh import Mesh


class DistributedTransport(Transport):
    def __init__(self, mesh: Mesh, layout: Layout, device: torch.device) -> None:
        self.mesh = mesh
        self.layout = layout
        self.device = device
        self._sends: list = []
        self._local = InProcessTransport()  # stages of this rank talking to each other

    def _rank(self, stage: int) -> int:
        return self.mesh.rank_at(self.layout.position_of(stage))

    def send(self, tensors: Tensors, src: int, dst: int) -> None:
        peer = self._rank(dst)
        if peer == self.mesh.rank:
            self._local.send(tensors, src, dst)
        else:
            self._sends += p2p.isend(tensors, peer, self.device)

    def recv(self, src: int, dst: int) -> Tensors:
        peer = self._rank(src)
        if peer == self.mesh.rank:
            return self._local.recv(src, dst)
        return p2p.recv(peer, self.device)

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
        p2p.wait_all(self._sends)
        self._sends = []

    def in_flight(self) -> dict[str, int]:
        return {"sends": len(self._sends), **self._local.in_flight()}
