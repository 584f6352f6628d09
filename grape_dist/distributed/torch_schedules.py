"""BP baselines on torch.distributed.pipelining's schedules, over the same stage modules.

`rule: bp` (or `fa`) with `pipeline.schedule: gpipe | 1f1b` trains the blocks of this rank's
stage with torch's `ScheduleGPipe` / `Schedule1F1B`, so that the comparison with the GrAPE
pipeline measures the learning rule, not two different model splits. Evaluation, weight
gathering and the optimiser step are the native runtime's. `zero_bubble` runs torch's
`ScheduleInterleavedZeroBubble`, which needs two virtual stages per rank: the model is cut into
2 x pp stages and rank r holds stages r and r + pp.

Torch's schedules need a fixed micro-batch shape, so these runs drop the last partial batch of
each epoch (the trainer does so when a torch schedule is configured).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from ..models import BlockModel
from ..rules import BackpropRule
from ..runtime.local import StepResult
from .pipeline import DistributedPipeline

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


def _input_shape(model: BlockModel, first: int) -> tuple[int, ...]:
    return model.input_shape if first == 0 else model.blocks[first - 1].out_shape


def _mean_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target)


class TorchScheduledPipeline(DistributedPipeline):
    """A `DistributedPipeline` whose training step is a torch pipelining schedule."""

    def __init__(self, stage, mesh, micro_batches: int, num_classes: int, model: BlockModel,
                 schedule: str, batch_size: int, optimizer_factory=None) -> None:
        super().__init__(stage, mesh, micro_batches, num_classes)
        if not isinstance(stage.rule, BackpropRule):
            raise ValueError(f"pipeline.schedule={schedule} trains with backprop; "
                             f"rule '{stage.rule.name}' runs on the native schedule")
        if batch_size % micro_batches:
            raise ValueError(f"torch schedules need equal micro-batches: data.batch_size="
                             f"{batch_size} is not divisible by pipeline.micro_batches="
                             f"{micro_batches}")
        mb = batch_size // micro_batches
        dtype = torch.get_default_dtype()
        self.rule = stage.rule
        self.virtual: list[tuple[int, int]] = []
        if schedule == "zero_bubble":
            from torch.distributed.pipelining import ScheduleInterleavedZeroBubble
            bounds = self._virtual_bounds(model)
            self.virtual = bounds
            self.torch_stages = [
                self._torch_stage(model, first, last, idx, 2 * mesh.pp, mb, dtype)
                for idx, (first, last) in enumerate(bounds)
                if idx % mesh.pp == mesh.stage
            ]
            self.schedule = ScheduleInterleavedZeroBubble(self.torch_stages, micro_batches,
                                                          loss_fn=_mean_ce)
            # This rank trains the blocks of its two virtual stages, not its native range:
            # a BP rule over those blocks owns their optimiser (the trainer schedules its lr
            # through stage.rule.optimizer).
            mine = [b for ts in self.torch_stages for b in ts.submod]
            self.rule = BackpropRule(mine, 0, len(model.blocks),
                                     optimizer_factory([p for b in mine for p in b.parameters()]))
            self.rule.reduce_fn = stage.rule.reduce_fn
            stage.rule.optimizer = self.rule.optimizer
            self.model = model
        else:
            ts = self._torch_stage(model, stage.first, stage.last, mesh.stage, mesh.pp, mb, dtype)
            self.torch_stages = [ts]
            self.schedule = SCHEDULES[schedule](ts, micro_batches, loss_fn=_mean_ce)
        self.first_rank_holds_input = any(s.is_first for s in self.torch_stages)
        self.holds_output = any(s.is_last for s in self.torch_stages)

    def _virtual_bounds(self, model: BlockModel) -> list[tuple[int, int]]:
        """Zero bubble: 2 x pp virtual stages; rank r holds stages r and r + pp."""
        from .partition import PartitionError, balanced_bounds, block_costs
        if 2 * self.mesh.pp > len(model.blocks):
            raise PartitionError(
                f"pipeline.schedule=zero_bubble needs 2 x pp = {2 * self.mesh.pp} virtual "
                f"stages but the model has {len(model.blocks)} blocks")
        return balanced_bounds(block_costs(model, "params"), 2 * self.mesh.pp)

    def _sync_virtual_blocks(self) -> None:
        """Zero bubble trains blocks outside the native ranges: before evaluating, every rank
        takes each block's weights from the rank that trained it."""
        with torch.no_grad():
            for idx, (first, last) in enumerate(self.virtual):
                owner = self.mesh.rank_of(idx % self.mesh.pp)
                for block in list(self.model.blocks)[first:last]:
                    for p in block.parameters():
                        dist.broadcast(p.data, owner, group=self.mesh.pipeline_group)

    def evaluate(self, x, y, batch_size):
        if self.virtual:
            self._sync_virtual_blocks()
        return super().evaluate(x, y, batch_size)

    def gather_model(self, model):
        if self.virtual:
            self._sync_virtual_blocks()
        return super().gather_model(model)

    def _torch_stage(self, model, first, last, index, num_stages, mb, dtype):
        module = nn.Sequential(*list(model.blocks)[first:last])
        example = torch.zeros(mb, *_input_shape(model, first), dtype=dtype,
                              device=self.device, requires_grad=first > 0)
        return PipelineStage(module, index, num_stages, self.device,
                             input_args=(example,), group=self.mesh.pipeline_group)

    def train_step(self, x, y, step: int, offset: int = 0, total: int | None = None):
        losses: list[torch.Tensor] = []
        kwargs = {}
        if self.holds_output:
            kwargs = {"target": y, "losses": losses}
        # Torch checks strides against the example input; size-1 dims can carry any stride.
        args = (torch.empty(x.shape, dtype=x.dtype, device=self.device).copy_(x),) \
            if self.first_rank_holds_input else ()
        out = self.schedule.step(*args, **kwargs)
        stats = torch.zeros(2, dtype=torch.float64, device=self.device)
        if self.holds_output:
            # Per-micro-batch mean losses -> the summed loss over the mini-batch.
            stats[0] = float(sum(float(v) for v in losses)) * len(y) / len(losses)
            stats[1] = float((out.argmax(1) == y).sum())
        # The loss lives on the rank holding the last stage (interleaved: 2pp-1 on rank pp-1).
        dist.broadcast(stats, self.last, group=self.mesh.pipeline_group)
        self.rule._apply_update()
        if self.mesh.dp > 1:
            dist.all_reduce(stats, group=self.mesh.replica_group)
        return StepResult(float(stats[0]), int(stats[1]), total or len(y), {})
