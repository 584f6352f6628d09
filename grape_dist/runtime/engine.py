"""The driver: this rank's stages, a transport and the schedules, behind one small interface.

The trainer talks only to a `PipelineEngine`; whether it holds every stage of a one-process run
or one stage of a pp x dp mesh is decided by `build.build_engine`, not here.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import trace
from ..models import BlockModel
from ..rules import DirectFeedbackRule, MicroBatch
from .batch_norm import ReplicaStatistics, batch_norms
from .final_state import save_stage_state
from .layout import Layout
from .probe import AlignmentProbe, Measure
from .schedules import Batch, Inference, Prepare, Schedule, StepResult, split_micro_batches
from .stage import Stage
from .transport import Transport


@dataclass
class CheckRows:
    """The rows a calibration step is judged on: this replica's share `x`, `y` of `total`,
    forwarded `chunk` rows at a time."""

    x: torch.Tensor
    y: torch.Tensor
    total: int
    chunk: int = 1000


@dataclass
class CalibrationResult:
    """A calibration step: its mini-batch's statistics and, when it was checked (`line_search`),
    the mean loss in eval mode per output (sample, or a language model's token) of the rows it
    was judged on (`outputs` in all), before and after it, and the fraction of the exact step
    that was kept (1 = all of it, 0 = undone)."""

    step: StepResult
    outputs: int = 0  # the rows judged x positions per row; 0 when the step was not checked
    loss_before: float | None = None
    loss_after: float | None = None
    scale: float = 1.0

    def to_json(self) -> dict:
        if self.loss_before is None:
            return {}
        return {"loss_before": self.loss_before / self.outputs,
                "loss_after": self.loss_after / self.outputs, "scale": self.scale}


class PipelineEngine:
    """Runs mini-batches, calibration steps, evaluation and the alignment probe on this rank's
    stages. Collective: every rank calls the same methods in the same order."""

    def __init__(self, model: BlockModel, stages: list[Stage], layout: Layout, rank: int,
                 transport: Transport, train: Schedule, calibration: Schedule | None,
                 micro_batches: int, device: torch.device) -> None:
        self.model = model  # meta except for this rank's blocks
        self.stages = stages
        self.layout = layout
        self.rank = rank
        self.replica = layout.replica(rank)
        self.transport = transport
        self.train_schedule = train
        self.calibration_schedule = calibration
        self.micro_batches = micro_batches
        self.device = device
        self.num_classes = model.num_classes
        self.inference = Inference(transport, layout.num_stages, device)
        # Replicas' BatchNorm running statistics, merged to one process's after every step.
        self.bn_stats = ReplicaStatistics(batch_norms(b for s in stages for b in s.blocks),
                                          self.replica, layout.dp, transport.all_reduce_replicas)

    # -- training --------------------------------------------------------------------------

    def _batch(self, x: torch.Tensor, y: torch.Tensor, step: int, offset: int,
               total: int | None) -> Batch:
        total = len(y) if total is None else total
        mbs = [MicroBatch(step, j, offset + start, size, total)
               for j, (start, size) in enumerate(split_micro_batches(len(y),
                                                                     self.micro_batches))]
        return Batch(x, y, mbs, offset, total)

    def train_step(self, x: torch.Tensor, y: torch.Tensor, step: int, offset: int = 0,
                   total: int | None = None) -> StepResult:
        """One mini-batch: this replica's rows `x`, `y`, the first being global row `offset`
        of a global mini-batch of `total` rows (default: these rows are all of it)."""
        stages = [(s.index, s.rule) for s in self.stages]
        return self._run(self.train_schedule, stages, self._batch(x, y, step, offset, total),
                         step)

    def _run(self, schedule: Schedule, stages: list, batch: Batch, step: int,
             kind: str = "step") -> StepResult:
        # One span per mini-batch on the timeline (grape_dist/trace.py; a no-op unless tracing).
        with trace.step(step, kind, micro_batches=len(batch.mbs)):
            self.bn_stats.snapshot()
            result = schedule.run(stages, batch)
            self.bn_stats.merge()
        return result

    def calibrate(self, x: torch.Tensor, y: torch.Tensor, step: int, offset: int = 0,
                  total: int | None = None, line_search: int = 0,
                  check: CheckRows | None = None) -> CalibrationResult:
        """One exact BP step through every stage on one mini-batch (Algorithm 1, step 4).

        `line_search` = k > 0: the step d is tried at lengths 1, 1/2, ..., 1/2^k, and the one
        with the lowest loss (eval mode, summed over replicas) on the rows `check` (default:
        the mini-batch) is kept, or none when none of them lowers it. Every rank sees the same
        losses, so every rank keeps the same length."""
        if self.calibration_schedule is None:
            raise RuntimeError("calibration is off for this run (calibration.every_epochs = 0)")
        stages = [(s.index, s.calibration) for s in self.stages]
        batch = self._batch(x, y, step, offset, total)
        if line_search <= 0:
            result = self._run(self.calibration_schedule, stages, batch, step, "calibration")
            return CalibrationResult(result)
        if check is None:
            check = CheckRows(x, y, batch.total)
        params = [p for s in self.stages for p in s.calibration.parameters()]
        start = [p.detach().clone() for p in params]
        # BatchNorm's running statistics move with the step's forward; an undone step puts
        # them back too.
        start_buffers = self._buffers()
        loss_before = self._loss_on(check)
        result = self._run(self.calibration_schedule, stages, batch, step, "calibration")
        moves = [p.detach() - w for p, w in zip(params, start)]
        best_scale, best_loss = 0.0, loss_before
        for scale in (0.5 ** j for j in range(line_search + 1)):
            self._move(params, start, moves, scale)
            loss = self._loss_on(check)
            if loss < best_loss:
                best_scale, best_loss = scale, loss
        self._move(params, start, moves, best_scale)
        if not best_scale:
            self._restore(start_buffers)
        outputs = check.total * self.model.signal_spec.positions
        return CalibrationResult(result, outputs, loss_before, best_loss, best_scale)

    def _buffers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(buffer, a copy) for every buffer of this rank's blocks (BatchNorm statistics)."""
        return [(b, b.clone()) for s in self.stages for blk in s.blocks for b in blk.buffers()]

    @staticmethod
    @torch.no_grad()
    def _restore(saved: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for b, v in saved:
            b.copy_(v)

    @staticmethod
    @torch.no_grad()
    def _move(params: list[torch.Tensor], start: list[torch.Tensor],
              moves: list[torch.Tensor], scale: float) -> None:
        for p, w, d in zip(params, start, moves):
            p.copy_(w + scale * d)

    def _loss_on(self, rows: CheckRows) -> float:
        """The summed loss of `rows` in eval mode (every replica's share, summed)."""
        stages = [(s.index, s.rule) for s in self.stages]
        starts = list(range(0, len(rows.y), rows.chunk))
        return self.inference.run(stages, rows.x, rows.y, starts, rows.chunk)[0]

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The weights' optimisers of this rank's stages (learning-rate schedules set them)."""
        return [s.rule.optimizer for s in self.stages]

    # -- evaluation ------------------------------------------------------------------------

    def evaluate(self, x: torch.Tensor, y: torch.Tensor, batch_size: int,
                 prepare: Prepare | None = None) -> tuple[float, int]:
        """(summed loss, correct) over (x, y) on every rank; chunks shared out over replicas.
        `prepare`: a chunk of `x` -> stage 0's input on the device (default: moved there)."""
        starts = list(range(0, len(y), batch_size))[self.replica::self.layout.dp]
        stages = [(s.index, s.rule) for s in self.stages]
        return self.inference.run(stages, x, y, starts, batch_size, prepare)

    def probe(self, x: torch.Tensor, y: torch.Tensor, seed: int, measure: Measure,
              max_outputs: int) -> dict[str, dict[str, float]]:
        """The alignment probe (runtime/probe.py) on the rows `x`, `y`, on every rank:
        {feedback point: `measure` of its exact derivatives}, in the points' order; empty for
        rules without feedback matrices. Replica 0 computes it; the others hold the same
        weights. The model is left as it was, BatchNorm running statistics included."""
        flat: dict[str, float] = {}
        rule = self.stages[0].rule
        # The rule is the same on every rank, so a replica's ranks agree on taking part.
        if self.replica == 0 and isinstance(rule, DirectFeedbackRule):
            schedule = AlignmentProbe(self.transport, self.layout.num_stages,
                                      self.model.signal_spec, self.device, measure, max_outputs)
            # One micro-batch of every row; its step keys the probe's tangents and dropout.
            batch = Batch(x, y, [MicroBatch(seed, 0, 0, len(y), len(y))], 0, len(y))
            # The probe runs in train mode like a step (BatchNorm on the probe batch's
            # statistics) but must not change the model.
            buffers = self._buffers()
            try:
                flat = schedule.run([(s.index, s.rule) for s in self.stages], batch).stats
            finally:
                self._restore(buffers)
        out: dict[str, dict[str, float]] = {}
        for key, value in self.merge_stats(flat).items():
            point, metric = key.rsplit("/", 1)
            out.setdefault(point, {})[metric] = value
        if not out:
            return out
        order = [pt.name for pt in rule.all_points]
        return dict(sorted(out.items(), key=lambda kv: order.index(kv[0])))

    def merge_stats(self, stats: dict) -> dict:
        """Every rank's entries (per-step statistics, per-block metrics), on every rank."""
        out: dict = {}
        for part in self.transport.all_gather_object(stats):
            out.update(part)
        return out

    # -- what this rank holds ----------------------------------------------------------------

    def memory_report(self) -> dict[str, list]:
        """Per rank (in rank order): block parameters held, feedback-matrix entries held, and
        peak memory in MB (the GPU allocator's high-water mark on CUDA, else peak RSS)."""
        # Whatever this rank materialised, not just what its rules train: the meta blocks of
        # other stages hold no memory.
        params = sum(p.numel() for p in self.model.parameters() if not p.is_meta)
        feedback = sum(b.numel() for s in self.stages
                       for b in s.rule.feedback_matrices().values())
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        rows = self.transport.all_gather_object((params, feedback, round(peak, 1)))
        return {"parameters_per_rank": [r[0] for r in rows],
                "feedback_parameters_per_rank": [r[1] for r in rows],
                "peak_memory_mb_per_rank": [r[2] for r in rows]}

    def save_final(self, out_dir: str | Path, step: int, epoch: int) -> None:
        """Each stage's weights and feedback matrices, written by replica 0's holder."""
        if self.replica == 0:
            for stage in self.stages:
                save_stage_state(out_dir, stage, self.layout.num_stages, step, epoch)
