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
    pp: int
    dp: int
    pipeline_group: object = None  # this replica's ranks (signal broadcast, torch schedules)
    replica_group: object = None  # this position's replicas (gradient all-reduce)

    @property
    def position(self) -> int:
        return self.rank % self.pp

    @property
    def replica(self) -> int:
        return self.rank // self.pp

    def rank_at(self, position: int) -> int:
        """The global rank of `position` in this rank's replica."""
        return self.replica * self.pp + position

    @classmethod
    def create(cls, layout: Layout) -> Mesh:
        rank = dist.get_rank()
        mesh = cls(rank, layout.pp, layout.dp)
        for r in range(layout.dp):
            g = dist.new_group([layout.rank_of(s, r) for s in range(layout.pp)])
            if r == mesh.replica:
                mesh.pipeline_group = g
        for s in range(layout.pp):
            g = dist.new_group([layout.rank_of(s, r) for r in range(layout.dp)])
            if s == mesh.position:
                mesh.replica_group = g
        return mesh
