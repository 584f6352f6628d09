"""The 2-D device mesh: `pp` pipeline stages x `dp` data-parallel replicas.

Rank r holds stage `r % pp` of replica `r // pp`, so a replica's stages are adjacent ranks (and
usually on one node). Every rank creates every group, in the same order, as torch requires.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


class MeshError(ValueError):
    pass


def check_mesh(world_size: int, pp: int, dp: int, num_blocks: int) -> tuple[int, int]:
    """Resolve pp=0 (= world_size / dp) and check that pp x dp fits; returns (pp, dp)."""
    if dp < 1:
        raise MeshError(f"pipeline.dp must be >= 1, got {dp}")
    if pp == 0:
        if world_size % dp:
            raise MeshError(f"WORLD_SIZE={world_size} is not a multiple of pipeline.dp={dp}")
        pp = world_size // dp
    if pp * dp != world_size:
        raise MeshError(
            f"pipeline.pp={pp} x pipeline.dp={dp} = {pp * dp} ranks, but WORLD_SIZE={world_size};"
            " launch pp x dp processes or set pipeline.pp=0 to derive pp")
    if pp > num_blocks:
        raise MeshError(
            f"pipeline.pp={pp} stages but the model has only {num_blocks} blocks; each stage "
            f"needs at least one block (use pp <= {num_blocks})")
    return pp, dp


@dataclass
class Mesh:
    rank: int
    pp: int
    dp: int
    pipeline_group: object = None  # this replica's stages (signal broadcast)
    replica_group: object = None  # this stage's replicas (gradient all-reduce)

    @property
    def stage(self) -> int:
        return self.rank % self.pp

    @property
    def replica(self) -> int:
        return self.rank // self.pp

    def rank_of(self, stage: int, replica: int | None = None) -> int:
        return (self.replica if replica is None else replica) * self.pp + stage

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.pp - 1

    @classmethod
    def create(cls, pp: int, dp: int) -> Mesh:
        rank = dist.get_rank()
        mesh = cls(rank, pp, dp)
        for r in range(dp):
            g = dist.new_group([r * pp + s for s in range(pp)])
            if r == mesh.replica:
                mesh.pipeline_group = g
        for s in range(pp):
            g = dist.new_group([r * pp + s for r in range(dp)])
            if s == mesh.stage:
                mesh.replica_group = g
        return mesh
