"""Where the pipeline's stages live: the pp x dp layout, checked before any rank joins a group.

World size = pp x dp. Rank r is position `r % pp` of replica `r // pp`, so a replica's ranks are
adjacent (usually on one node). Native schedules put one stage on each position; torch's
schedules with two stages per rank cut the model into 2 x pp stages and place them in a loop
(interleaved zero bubble: position p holds stages p and p + pp) or a V (ZBV, DualPipeV: p and
2pp - 1 - p). One process is the layout with one position holding every stage.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import Config
from ..errors import StartupError


class LayoutError(StartupError, ValueError):
    """The requested mesh, split or schedule does not fit the world size or the model."""

    prefix = "config error"


# Stages per pipeline position, and their placement, for each schedule.
_PLACEMENT = {"native": "one", "gpipe": "one", "1f1b": "one", "zero_bubble": "loop",
              "zbv": "v", "dualpipev": "v"}


@dataclass(frozen=True)
class Layout:
    world_size: int
    pp: int  # ranks per pipeline (positions)
    dp: int  # data-parallel replicas
    num_stages: int  # pp, or 2 x pp for the two-stages-per-rank schedules
    placement: str = "one"  # one | loop | v

    @classmethod
    def in_process(cls, num_stages: int = 1) -> Layout:
        """Every stage in this process (one rank, one replica)."""
        return cls(1, 1, 1, num_stages, "all")

    def position_of(self, stage: int) -> int:
        """The pipeline position (rank within a replica) that holds `stage`."""
        if self.placement == "all":
            return 0
        if self.placement == "one":
            return stage
        if self.placement == "loop":
            return stage % self.pp
        return stage if stage < self.pp else 2 * self.pp - 1 - stage

    def stages_at(self, position: int) -> list[int]:
        """The stages held at `position`, in pipeline order."""
        return [s for s in range(self.num_stages) if self.position_of(s) == position]

    def rank_of(self, position: int, replica: int) -> int:
        return replica * self.pp + position

    def position(self, rank: int) -> int:
        return rank % self.pp

    def replica(self, rank: int) -> int:
        return rank // self.pp

    def describe(self) -> str:
        return (f"pp={self.pp} x dp={self.dp} ({self.world_size} ranks), {self.num_stages} "
                f"stages, placement {self.placement}")


def plan_layout(cfg: Config, num_blocks: int, world_size: int, backend: str = "gloo") -> Layout:
    """Resolve and check the layout of `cfg.pipeline` for `world_size` ranks and a model of
    `num_blocks` blocks; raises LayoutError naming the keys and the fix. Every rank computes the
    same answer from the same inputs, so all of them stop before joining a process group."""
    p = cfg.pipeline
    if p.pp == 0:
        if world_size % p.dp:
            raise LayoutError(f"WORLD_SIZE={world_size} is not a multiple of pipeline.dp={p.dp}")
        pp = world_size // p.dp
    else:
        pp = p.pp
    if pp * p.dp != world_size:
        raise LayoutError(
            f"pipeline.pp={pp} x pipeline.dp={p.dp} = {pp * p.dp} ranks, but WORLD_SIZE="
            f"{world_size}; launch pp x dp processes or set pipeline.pp=0 to derive pp")
    placement = _PLACEMENT[p.schedule]
    per_rank = 2 if placement in ("loop", "v") else 1
    stages = per_rank * pp
    if stages > num_blocks:
        what = f"pipeline.pp={pp} stages" if per_rank == 1 else \
            f"pipeline.schedule={p.schedule} needs 2 x pp = {stages} stages"
        raise LayoutError(
            f"{what} but the model has only {num_blocks} blocks; each stage needs at least one "
            f"block (use pp <= {num_blocks // per_rank})")
    if world_size == 1 and p.stage_streams:
        # Layer-parallel on one GPU: one stage per block (or per stage_blocks entry), each on
        # its own CUDA stream (runtime/streams.py).
        stages = len(p.stage_blocks) if p.stage_blocks else num_blocks
    if p.stage_blocks:
        check_stage_blocks(p.stage_blocks, num_blocks, stages)
    if p.schedule != "native":
        _check_torch_schedule(cfg, pp)
    if p.streaming and backend == "nccl" and pp > 1:
        raise LayoutError(
            "pipeline.streaming posts collectives and point-to-point transfers in an order that "
            "is safe on gloo but has not been run on NCCL; use the default synchronous signal "
            "(pipeline.streaming=false) or train.device=cpu")
    return Layout(world_size, pp, p.dp, stages, "all" if world_size == 1 else placement)


def check_stage_blocks(sizes: list[int], num_blocks: int, stages: int) -> None:
    if len(sizes) != stages:
        raise LayoutError(
            f"pipeline.stage_blocks has {len(sizes)} entries for {stages} stages")
    if any(s < 1 for s in sizes) or sum(sizes) != num_blocks:
        raise LayoutError(
            f"pipeline.stage_blocks={sizes} must be positive block counts summing to the "
            f"model's {num_blocks} blocks")


def _check_torch_schedule(cfg: Config, pp: int) -> None:
    """What torch.distributed.pipelining's schedules need, checked before they are built."""
    p, m = cfg.pipeline, cfg.pipeline.micro_batches
    if pp < 2:
        raise LayoutError(
            f"pipeline.schedule={p.schedule} runs torch's pipelining over at least 2 ranks; on "
            "one process use pipeline.schedule=native")
    if cfg.data.batch_size % m:
        raise LayoutError(
            f"pipeline.schedule={p.schedule} needs equal micro-batches: data.batch_size="
            f"{cfg.data.batch_size} is not divisible by pipeline.micro_batches={m}")
    if p.schedule == "1f1b" and m < pp:
        raise LayoutError(f"pipeline.schedule=1f1b needs pipeline.micro_batches >= pp = {pp} "
                          f"(torch's Schedule1F1B), got {m}")
    if p.schedule == "dualpipev" and m < 2 * pp:
        raise LayoutError(f"pipeline.schedule=dualpipev needs pipeline.micro_batches >= 2 x pp "
                          f"= {2 * pp} (torch's ScheduleDualPipeV), got {m}")
    if p.schedule == "zero_bubble" and m % max(1, m // pp):
        raise LayoutError(
            f"pipeline.schedule=zero_bubble needs pipeline.micro_batches to be a multiple of "
            f"micro_batches // pp = {m // pp} (torch's ScheduleInterleavedZeroBubble), got {m}")
