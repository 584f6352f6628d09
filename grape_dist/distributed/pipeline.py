"""The pipeline across ranks: one stage per rank, activations and tangents flowing forward,
the output signal broadcast to every stage, concurrent local updates.

Each rank runs the same `StageRule` code as the single process (`runtime/local.py`); only the
transport differs:
- forward: stage s receives a micro-batch's activation and tangent bundle from stage s-1
  (`p2p.recv`), runs its blocks, and starts sending to stage s+1 (`p2p.isend`) before taking the
  next micro-batch, so the transfer overlaps compute;
- direct rules (DFA, DRTP, GrAPE): after the last micro-batch the last stage broadcasts the
  signals of all micro-batches (errors, output tangents, loss) to its pipeline in one collective;
  every stage then refines its B and updates its weights at the same time. No gradient travels
  backward between stages;
- BP and FA (and every rule's calibration step): the native schedule runs all forwards, then the
  backward stage by stage in reverse, passing input gradients back;
- data parallel: the replicas of a stage sum their gradients (and GrAPE's Jacobian estimates)
  with one all-reduce before stepping, so every replica takes the same step.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..rules import MicroBatch, OutputSignal, StageRule, output_signal
from ..runtime.local import StepResult, split_micro_batches
from ..runtime.stage import Stage
from . import p2p
from .mesh import Mesh


def all_reduce_sum(tensors: list[torch.Tensor], group) -> None:
    """Sum `tensors` in place over `group` with one collective (flattened, same dtype)."""
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, group=group)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def _pack(signal: OutputSignal, loss: float = 0.0, correct: int = 0) -> torch.Tensor:
    parts = [torch.tensor([loss, float(correct)], dtype=torch.float64,
                          device=signal.error.device),
             signal.error.reshape(-1).double()]
    if signal.tangents is not None:
        parts.append(signal.tangents.reshape(-1).double())
    return torch.cat(parts)


class DistributedPipeline:
    """This rank's stage of a pp x dp mesh; same interface as `LocalPipeline`."""

    def __init__(self, stage: Stage, mesh: Mesh, micro_batches: int, num_classes: int) -> None:
        self.stage = stage
        self.stages = [stage]
        self.mesh = mesh
        self.micro_batches = micro_batches
        self.num_classes = num_classes
        self.device = stage.rule.device
        self.prev = mesh.rank_of(mesh.stage - 1) if not mesh.is_first else None
        self.next = mesh.rank_of(mesh.stage + 1) if not mesh.is_last else None
        self.last = mesh.rank_of(mesh.pp - 1)
        if mesh.dp > 1:
            for rule in (stage.rule, stage.calibration):
                if rule is not None:
                    rule.reduce_fn = lambda ts: all_reduce_sum(ts, mesh.replica_group)

    # -- training --------------------------------------------------------------------------

    def train_step(self, x, y, step: int, offset: int = 0, total: int | None = None):
        return self._mini_batch(self.stage.rule, x, y, step, offset, total or len(y))

    def calibrate(self, x, y, step: int, offset: int = 0, total: int | None = None):
        if self.stage.calibration is None:
            raise RuntimeError("calibration is off for this run (calibration.every_epochs = 0)")
        return self._mini_batch(self.stage.calibration, x, y, step, offset, total or len(y))

    def _mini_batch(self, rule: StageRule, x, y, step, offset, total) -> StepResult:
        mbs = [MicroBatch(step, j, offset + start, size, total)
               for j, (start, size) in enumerate(split_micro_batches(len(y), self.micro_batches))]
        stats = torch.zeros(2, dtype=torch.float64, device=self.device)  # summed loss, correct
        signals: list[OutputSignal | None] = [None] * len(mbs)
        streaming = rule.streaming and not rule.sequential_backward
        # Streaming: a micro-batch's signal is consumed once the pipeline has had time to
        # produce it, i.e. after this stage forwarded (pp - 1 - stage) further micro-batches.
        window = self.mesh.pp - 1 - self.mesh.stage
        packets: dict[int, tuple[torch.Tensor, object]] = {}
        pending: list[MicroBatch] = []
        sends = []
        for mb in mbs:
            rows = slice(mb.start - offset, mb.start - offset + mb.size)
            if streaming and self.next is not None:
                packets[mb.index] = self._post_signal(rule, mb, None)
            if self.prev is None:
                h, t = x[rows], None
            else:
                h, t = p2p.recv(self.prev, self.device)
            h, t = rule.forward(mb, h, t)
            if self.next is not None:
                sends += p2p.isend([h, t], self.next, self.device)
            else:
                loss, correct, signals[mb.index] = output_signal(h, y[rows], total, t)
                stats += torch.tensor([loss, correct], dtype=torch.float64, device=self.device)
                if streaming:
                    packets[mb.index] = self._post_signal(rule, mb, signals[mb.index], loss,
                                                          correct)
            if streaming:
                pending.append(mb)
                while len(pending) > window:
                    stats += self._consume(rule, pending.pop(0), packets, y, offset)
        while pending:
            stats += self._consume(rule, pending.pop(0), packets, y, offset)
        p2p.wait_all(sends)
        if rule.sequential_backward:
            self._sequential_backward(rule, mbs, signals)
            dist.broadcast(stats, self.last, group=self.mesh.pipeline_group)
        elif not streaming:
            flat = torch.cat([stats] + [_pack(s) for s in signals]) if self.next is None \
                else torch.empty(2 + sum(self._packet_size(rule, mb) for mb in mbs),
                                 dtype=torch.float64, device=self.device)
            dist.broadcast(flat, self.last, group=self.mesh.pipeline_group)
            stats, pos = flat[:2].clone(), 2
            for mb in mbs:
                n = self._packet_size(rule, mb)
                if self.next is not None:
                    signals[mb.index] = self._unpack(rule, mb, flat[pos:pos + n], y, offset)
                pos += n
                rule.backward(mb, signals[mb.index], None)
            if rule.second_pass:
                self._modulated_pass(rule, mbs, signals)
        out = rule.finish_step()
        if self.mesh.dp > 1:
            dist.all_reduce(stats, group=self.mesh.replica_group)
        return StepResult(float(stats[0]), int(stats[1]), total, out)

    # -- the broadcast signal ----------------------------------------------------------------
    # A micro-batch's packet is [loss, correct, error (size x C), output tangents (K x m x C)],
    # in float64; its size follows from the config, so receivers preallocate it.

    def _packet_size(self, rule: StageRule, mb: MicroBatch) -> int:
        km = rule.output_tangent_shape(mb.size)
        return (2 + mb.size * self.num_classes
                + (km[0] * km[1] * self.num_classes if km else 0))

    def _post_signal(self, rule: StageRule, mb: MicroBatch, signal: OutputSignal | None,
                     loss: float = 0.0, correct: int = 0):
        """Start the broadcast of one micro-batch's packet (the last stage sends it)."""
        if signal is not None:
            buf = _pack(signal, loss, correct)
        else:
            buf = torch.empty(self._packet_size(rule, mb), dtype=torch.float64, device=self.device)
        work = dist.broadcast(buf, self.last, group=self.mesh.pipeline_group, async_op=True)
        return buf, work

    def _consume(self, rule: StageRule, mb: MicroBatch, packets, y, offset) -> torch.Tensor:
        buf, work = packets.pop(mb.index)
        work.wait()
        rule.backward(mb, self._unpack(rule, mb, buf, y, offset), None)
        # Stats come with the packet: counted once, by the stages that are not the last.
        if self.next is None:
            return torch.zeros(2, dtype=torch.float64, device=self.device)
        return buf[:2].clone()

    def _unpack(self, rule, mb: MicroBatch, buf: torch.Tensor, y, offset) -> OutputSignal:
        c = self.num_classes
        dtype = torch.get_default_dtype()
        e = buf[2:2 + mb.size * c].view(mb.size, c).to(dtype)
        km = rule.output_tangent_shape(mb.size)
        t = buf[2 + mb.size * c:].view(km[0], km[1], c).to(dtype) if km else None
        # The targets come from this rank's own copy of the labels.
        labels = y[mb.start - offset:mb.start - offset + mb.size]
        onehot = torch.nn.functional.one_hot(labels, c).to(dtype)
        return OutputSignal(e, onehot, t, mb.total)

    def _sequential_backward(self, rule: StageRule, mbs, signals) -> None:
        sends = []
        for mb in reversed(mbs):
            grad = None if self.next is None else p2p.recv(self.next, self.device)[0]
            g_in = rule.backward(mb, signals[mb.index], grad)
            if self.prev is not None:
                sends += p2p.isend([g_in], self.prev, self.device)
        p2p.wait_all(sends)

    def _modulated_pass(self, rule: StageRule, mbs, signals) -> None:
        sends = []
        for mb in mbs:
            h = None if self.prev is None else p2p.recv(self.prev, self.device)[0]
            h = rule.modulated_forward(mb, signals[mb.index], h)
            if self.next is not None:
                sends += p2p.isend([h], self.next, self.device)
        p2p.wait_all(sends)

    # -- evaluation and state ----------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, int]:
        """(summed loss, correct) over (x, y), chunks shared out across replicas."""
        stats = torch.zeros(2, dtype=torch.float64, device=self.device)
        chunks = list(range(0, len(y), batch_size))[self.mesh.replica::self.mesh.dp]
        sends = []
        for start in chunks:
            h = (x[start:start + batch_size].to(self.device) if self.prev is None
                 else p2p.recv(self.prev, self.device)[0])
            h = self.stage.rule.infer(h)
            if self.next is not None:
                sends += p2p.isend([h], self.next, self.device)
            else:
                loss, correct, _ = output_signal(h, y[start:start + batch_size].to(self.device),
                                                 1, None)
                stats += torch.tensor([loss, correct], dtype=torch.float64, device=self.device)
        p2p.wait_all(sends)
        dist.all_reduce(stats)  # only last stages hold non-zero sums
        return float(stats[0]), int(stats[1])

    def merge_stats(self, stats: dict[str, float]) -> dict[str, float]:
        """Every stage's per-block statistics, on every rank."""
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, stats)
        out: dict[str, float] = {}
        for p in parts:
            out.update(p)
        return out

    def gather_model(self, model) -> dict[int, torch.Tensor] | None:
        """Copy every stage's weights (replica 0) into rank 0's `model`; returns all feedback
        matrices on rank 0 (None elsewhere)."""
        mine = None
        if self.mesh.replica == 0:
            # On the CPU: objects are pickled, and a CUDA tensor would come back on the
            # sender's device index.
            blocks = {i: {k: v.detach().cpu() for k, v in model.blocks[i].named_parameters()}
                      for i in range(self.stage.first, self.stage.last)}
            mine = (blocks, {i: b.cpu() for i, b in self.stage.rule.feedback_matrices().items()})
        gathered = [None] * dist.get_world_size() if self.mesh.rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        if self.mesh.rank != 0:
            return None
        feedback: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            for item in gathered:
                if item is None:
                    continue
                blocks, fb = item
                for i, params in blocks.items():
                    for k, p in model.blocks[i].named_parameters():
                        p.copy_(params[k])
                feedback.update({i: b.to(self.device) for i, b in fb.items()})
        return feedback
