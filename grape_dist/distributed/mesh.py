"""The process groups of a pp x dp layout (checked beforehand by `runtime.layout.plan_layout`).

Rank r is position `r % pp` of replica `r // pp`. Every rank creates every group, in the same
order, as torch requires.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from ..runtime.layout import Layout


@dataclass
class Mesh:
    rank: int
    layout: Layout
    pipeline_group: object = None  # this replica's ranks (signal broadcast, torch schedules)
    replica_group: object = None  # this position's replicas (gradient all-reduce)

    @property
    def dp(self) -> int:
        return self.layout.dp

    def rank_at(self, position: int) -> int:
        """The global rank of `position` in this rank's replica."""
        return self.layout.rank_of(position, self.layout.replica(self.rank))

    @classmethod
    def create(cls, layout: Layout) -> Mesh:
        mesh = cls(dist.get_rank(), layout)
        position, replica = layout.position(mesh.rank), layout.replica(mesh.rank)
        for r in range(layout.dp):
            g = dist.new_group([layout.rank_of(s, r) for s in range(layout.pp)])
            if r == replica:
                mesh.pipeline_group = g
        for s in range(layout.pp):
            g = dist.new_group([layout.rank_of(s, r) for r in range(layout.dp)])
            if s == position:
                mesh.replica_group = g
        return mesh
