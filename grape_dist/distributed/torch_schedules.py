"""BP baselines on torch.distributed.pipelining's schedules, over the same stages and blocks.

`rule: bp` (or `fa`) with `pipeline.schedule` = `gpipe` | `1f1b` (one stage per rank) or
`zero_bubble` | `zbv` | `dualpipev` (two stages per rank, placed by `runtime.layout`) trains
this rank's stages with torch's schedule, so that the comparison with the GrAPE pipeline
measures the learning rule, not two different model splits. The optimiser step (with the
data-parallel gradient sum) is the stages' own BP rule's; evaluation and everything else run on
the native schedules over the same placement.

Torch's schedules need a fixed micro-batch shape, so these runs drop the last partial batch of
each epoch (the trainer does so when a torch schedule is configured).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleGPipe,
    ScheduleInterleavedZeroBubble,
    ScheduleZBVZeroBubble,
)

from .. import trace
from ..models import BlockModel
from ..rules import BackpropRule
from ..runtime.schedules import Batch, LocalStages, Schedule, StepResult
from ..runtime.stage import Stage
from .mesh import Mesh

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B,
             "zero_bubble": ScheduleInterleavedZeroBubble, "zbv": ScheduleZBVZeroBubble,
             "dualpipev": ScheduleDualPipeV}


def _mean_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The mean over every output position: (N, C) logits, or a language model's (N, T, C)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))


def _traced(fn, name: str, lane: str = "compute", index: int | None = None):
    def wrapper(*args, **kwargs):
        mb = args[0] if args else None
        with trace.span(name, lane, **({"stage": index, "mb": mb} if index is not None
                                          else {})):
            return fn(*args, **kwargs)
    wrapper.__wrapped__ = fn
    return wrapper


def _trace_torch_pipelining(stages: list[PipelineStage]) -> None:
    """Timeline spans (grape_dist/trace.py) inside torch's schedules: each stage's forward,
    backward and weight-backward chunk, and the schedules' waits for their transfers."""
    for st in stages:
        for attr, name in (("forward_one_chunk", "forward"), ("backward_one_chunk", "backward"),
                           ("backward_weight_one_chunk", "backward weight")):
            setattr(st, attr, _traced(getattr(st, attr), name, index=st.stage_index))
    import torch.distributed.pipelining.schedules as schedules

    if not hasattr(schedules._wait_batch_p2p, "__wrapped__"):
        schedules._wait_batch_p2p = _traced(schedules._wait_batch_p2p, "p2p wait", "comm")


class TorchPipelineSchedule(Schedule):
    """A training step through one of torch's pipelining schedules."""

    def __init__(self, name: str, model: BlockModel, stages: list[Stage], num_stages: int,
                 mesh: Mesh, transport, micro_batches: int, batch_size: int,
                 device: torch.device) -> None:
        super().__init__(transport, num_stages, model.num_classes, device)
        self.name = name
        if not all(isinstance(s.rule, BackpropRule) for s in stages):
            raise ValueError(f"pipeline.schedule={name} trains with backprop; rule "
                             f"'{stages[0].rule.name}' runs on the native schedule")
        mb = batch_size // micro_batches
        dtype = torch.get_default_dtype()
        # The first stage takes the model's inputs: token ids (torch.long) for a language model.
        input_dtype = model.input_dtype or dtype
        self.torch_stages = []
        for s in stages:
            shape = model.input_shape if s.first == 0 else model.blocks[s.first - 1].out_shape
            example = torch.zeros(mb, *shape, dtype=input_dtype if s.first == 0 else dtype,
                                  device=device, requires_grad=s.first > 0)
            self.torch_stages.append(PipelineStage(
                nn.Sequential(*s.blocks), s.index, num_stages, device, input_args=(example,),
                group=mesh.pipeline_group))
        if trace.enabled():
            _trace_torch_pipelining(self.torch_stages)
        # GPipe and 1F1B take one stage, the two-stages-per-rank schedules a list.
        arg = self.torch_stages if len(self.torch_stages) > 1 else self.torch_stages[0]
        self.schedule = SCHEDULES[name](arg, micro_batches, loss_fn=_mean_ce)
        self.holds_input = any(s.is_first for s in self.torch_stages)
        self.holds_output = any(s.is_last for s in self.torch_stages)

    def run(self, stages: LocalStages, batch: Batch) -> StepResult:
        losses: list[torch.Tensor] = []
        kwargs = {"target": batch.y, "losses": losses} if self.holds_output else {}
        # Torch checks strides against the example input; size-1 dims can carry any stride.
        args = (torch.empty(batch.x.shape, dtype=batch.x.dtype, device=self.device)
                .copy_(batch.x),) if self.holds_input else ()
        out = self.schedule.step(*args, **kwargs)
        stats = self._stats()
        if self.holds_output:
            # Per-micro-batch mean losses -> the summed loss over the mini-batch.
            # (the outputs: samples, or samples x positions for a language model)
            stats[0] = float(sum(float(v) for v in losses)) * batch.y.numel() / len(losses)
            stats[1] = float((out.argmax(-1) == batch.y).sum())
        # The loss lives on the rank holding the last stage.
        self.transport.broadcast(stats, self.last).wait()
        return self._finish(stages, stats, batch)
