"""The schedules: how one mini-batch moves through this rank's stages, written once.

A schedule gets this rank's stages as (pipeline index, rule) pairs in pipeline order: every
stage in one process, one stage (or two, for torch's V schedules) per rank otherwise. It runs
each stage's part in an order that is valid whichever stages are local: a stage takes its input
from the data (stage 0) or from `transport.recv`, and hands its output on with `transport.send`;
the last stage's signals reach every stage through `transport.broadcast`. One process, torchrun
with one rank and P ranks therefore run this same code over different transports.

- `ForwardThenBroadcast` (DFA, DRTP, GrAPE): all micro-batches forward, then one broadcast of
  all their signals; every stage then updates concurrently. No gradient crosses stages.
- `TwoForwardPasses` (PEPITA): the same, then the modulated second forward pass.
- `StreamingSignals` (direct rules with `pipeline.streaming`): each micro-batch's signal is
  broadcast as soon as it exists and consumed once the stage has forwarded as many further
  micro-batches as there are stages after it, so a stage holds about pp micro-batches.
- `SequentialBackward` (BP, FA, and every rule's calibration step): all forwards, then the
  backward stage by stage in reverse, passing input gradients back.

Every schedule ends its mini-batch by checking that nothing is left in flight: no pending send,
no queued message, no unconsumed packet, nothing stashed in a rule.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .. import trace
from ..models.dropout import dropout_rows
from ..rules import MicroBatch, OutputSignal, SignalSpec, StageRule, output_signal
from .signals import SignalCodec
from .transport import Handle, InFlightError, Transport, message_key

LocalStages = list[tuple[int, StageRule]]
# Rows of a held split -> stage 0's input on the device (data/held.py: normalising uint8 images).
Prepare = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Batch:
    """This replica's share of a global mini-batch: rows `x`, `y` (the first is global row
    `offset`), split into `mbs` (none for a replica without rows), of a mini-batch of `total`
    rows."""

    x: torch.Tensor
    y: torch.Tensor
    mbs: list[MicroBatch]
    offset: int
    total: int


@dataclass
class StepResult:
    """A mini-batch's statistics: Python numbers, or 0-d device tensors when the schedule was
    told not to read them (`Schedule.read_stats`, for CUDA graph capture)."""

    loss_sum: float  # over the whole global mini-batch (all replicas)
    correct: int
    samples: int
    stats: dict[str, float] = field(default_factory=dict)


def split_micro_batches(total: int, micro_batches: int) -> list[tuple[int, int]]:
    """(start, size) of each micro-batch; sizes differ by at most one; none for no rows."""
    if total == 0:
        return []
    m = min(micro_batches, total)
    base, extra = divmod(total, m)
    out, start = [], 0
    for i in range(m):
        size = base + (i < extra)
        out.append((start, size))
        start += size
    return out


def _key(kind: str, rule: StageRule, mb: MicroBatch) -> tuple:
    """The key of a micro-batch's message between stages (runtime/transport.py): its rows fix
    its shapes (a GrAPE activation's tangent rows too)."""
    return message_key(f"{kind}/{rule.name}", mb.start, mb.size, mb.total)


class Schedule:
    """Shared plumbing: a stage's input and output, the last stage's loss, the end checks."""

    name = "schedule"
    # False: leave the statistics on the device (no host synchronisation; what a CUDA graph
    # capture of a whole step needs).
    read_stats = True

    def __init__(self, transport: Transport, num_stages: int, spec: SignalSpec,
                 device: torch.device) -> None:
        self.transport = transport
        self.last = num_stages - 1
        self.spec = spec
        self.device = device

    def run(self, stages: LocalStages, batch: Batch) -> StepResult:
        """One mini-batch through this rank's stages."""
        raise NotImplementedError

    # -- pieces ------------------------------------------------------------------------------

    def _forward(self, s: int, rule: StageRule, mb: MicroBatch, batch: Batch,
                 stats: torch.Tensor) -> OutputSignal | None:
        """Stage s's forward of `mb`; at the last stage, the loss (added to `stats`) and the
        output signal."""
        rows = slice(mb.start - batch.offset, mb.start - batch.offset + mb.size)
        with self.transport.stage(s):
            if s == 0:
                h, t = batch.x[rows], None
            else:
                with trace.span("recv", "comm", src=s - 1, dst=s):
                    h, t = self.transport.recv(s - 1, s, _key("fwd", rule, mb))
            # Dropout masks keyed by the mini-batch's global rows (models/dropout.py); the rule's
            # name keeps a calibration step's masks apart from the training step's.
            with dropout_rows(mb.step, mb.start, mb.size, mb.total, stream=rule.name), \
                    trace.span("forward", stage=s, mb=mb.index):
                h, t = rule.forward(mb, h, t)
            if s != self.last:
                with trace.span("send", "comm", src=s, dst=s + 1):
                    self.transport.send([h, t], s, s + 1, _key("fwd", rule, mb))
                return None
            with trace.span("loss", mb=mb.index):
                loss, correct, signal = output_signal(h, batch.y[rows], mb.total, t)
                stats += torch.stack([loss.to(stats.dtype), correct.to(stats.dtype)])
                return rule.signal_at_output(mb, signal)

    def _backward(self, s: int, rule: StageRule, mb: MicroBatch, signal: OutputSignal) -> None:
        """Stage s takes `mb`'s broadcast signal (a direct rule's backward)."""
        with self.transport.stage(s), trace.span("backward", stage=s, mb=mb.index):
            self.transport.share(signal.tensors(), self.last, s)
            rule.backward(mb, signal, None)

    def _stats(self) -> torch.Tensor:
        """The [summed loss, #correct] buffer of a mini-batch; stage streams may use it."""
        stats = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.transport.fork()
        return stats

    def _finish(self, stages: LocalStages, stats: torch.Tensor, batch: Batch,
                broadcasts: list[tuple[torch.Tensor, Handle]] = (), **pending: int) -> StepResult:
        """Apply every stage's update, sum the statistics over replicas, check that nothing is
        left in flight. `broadcasts`: (packet, handle) of the broadcasts this rank started as
        the root; they complete while the updates run (which do not read them)."""
        out: dict = {}
        for s, rule in stages:
            self.transport.hold(rule.held_tensors)
            with self.transport.stage(s), trace.span("update", stage=s):
                out.update(rule.finish_step())
        with trace.span("broadcast wait", "comm"):
            for _, handle in broadcasts:
                handle.wait()
        with trace.span("all_reduce", "comm"):
            self.transport.all_reduce_replicas([stats])
        with trace.span("flush", "comm"):
            self.transport.flush()
            self.transport.join()
        self._check_idle(stages, **pending)
        if not self.read_stats:
            return StepResult(stats[0], stats[1], batch.total, out)  # type: ignore[arg-type]
        # Device statistics are read once, after every stage's work was issued.
        return StepResult(float(stats[0]), int(stats[1]), batch.total,
                          {k: float(v) for k, v in out.items()})

    def _check_idle(self, stages: LocalStages, **pending: int) -> None:
        where = f"end of mini-batch ({self.name})"
        self.transport.check_idle(where)
        stashed = {s: rule.in_flight() for s, rule in stages if rule.in_flight()}
        if stashed:
            raise InFlightError(f"{where}: stages still hold micro-batches {stashed}")
        left = {k: v for k, v in pending.items() if v}
        if left:
            raise InFlightError(f"{where}: {left} left over")

    def _holds_last(self, stages: LocalStages) -> bool:
        return stages[-1][0] == self.last


class ForwardThenBroadcast(Schedule):
    """Direct rules: all forwards, one broadcast of every micro-batch's signal, concurrent
    updates (the default synchronous semantics)."""

    name = "forward-then-broadcast"

    def run(self, stages, batch):
        stats = self._stats()
        signals: list[OutputSignal] = []
        posted: list[tuple[torch.Tensor, Handle]] = []  # the root's broadcast
        for mb in batch.mbs:
            for s, rule in stages:
                signal = self._forward(s, rule, mb, batch, stats)
                if signal is not None:
                    signals.append(signal)
        if not self.transport.local_only:
            codec = SignalCodec(stages[0][1], self.spec, self.device)
            holds_last = self._holds_last(stages)
            with trace.span("broadcast", "comm", root=self.last):
                packet = codec.pack(stats, signals) if holds_last else codec.empty(batch.mbs)
                handle = self.transport.broadcast(packet, self.last)
            if holds_last:
                # The root's updates need nothing from its broadcast: `_finish` waits after them.
                posted.append((packet, handle))
            else:
                with trace.span("broadcast wait", "comm"):
                    handle.wait()
                    stats, signals = codec.unpack(packet, batch.mbs, batch.y, batch.offset)
        for s, rule in stages:
            for mb, signal in zip(batch.mbs, signals):
                self._backward(s, rule, mb, signal)
        self._after_signal(stages, batch.mbs, signals)
        return self._finish(stages, stats, batch, posted)

    def _after_signal(self, stages: LocalStages, mbs: list[MicroBatch],
                      signals: list[OutputSignal]) -> None:
        pass


class TwoForwardPasses(ForwardThenBroadcast):
    """PEPITA: after the signal, a second forward pass on the error-modulated input."""

    name = "two-forward-passes"

    def _after_signal(self, stages, mbs, signals):
        for mb, signal in zip(mbs, signals):
            for s, rule in stages:
                with self.transport.stage(s):
                    self.transport.share(signal.tensors(), self.last, s)
                    h = None
                    if s != 0:
                        with trace.span("recv", "comm", src=s - 1, dst=s):
                            h = self.transport.recv(s - 1, s, _key("mod", rule, mb))[0]
                    with trace.span("modulated forward", stage=s, mb=mb.index):
                        h = rule.modulated_forward(mb, signal, h)
                    if s != self.last:
                        with trace.span("send", "comm", src=s, dst=s + 1):
                            self.transport.send([h], s, s + 1, _key("mod", rule, mb))


class StreamingSignals(Schedule):
    """Direct rules with `pipeline.streaming`: per-micro-batch signals and updates.

    Stage s consumes micro-batch j's signal after forwarding micro-batch j + (last - s), when
    the pipeline has had time to produce it. The rank holding the last stage starts each
    micro-batch's broadcast as soon as the signal exists; the other ranks join it as soon as
    they have forwarded that micro-batch (or first need it), so the signal arrives while they
    forward the next ones, and every rank issues the same collectives, in micro-batch order,
    between the same point-to-point messages.
    """

    name = "streaming-signals"

    def run(self, stages, batch):
        mbs = batch.mbs
        stats = self._stats()
        codec = SignalCodec(stages[0][1], self.spec, self.device)
        local = self.transport.local_only
        signals: dict[int, OutputSignal] = {}
        posted = []  # broadcasts this rank started as the root
        joined: deque = deque()  # (micro-batch, packet, handle) joined, not yet unpacked
        waiting: dict[int, deque[MicroBatch]] = {s: deque() for s, _ in stages}

        def join(upto: int) -> None:
            """Join the broadcasts of micro-batches up to index `upto`, in order."""
            while len(signals) + len(joined) <= upto:
                nxt = mbs[len(signals) + len(joined)]
                with trace.span("broadcast", "comm", root=self.last, mb=nxt.index):
                    packet = codec.empty([nxt])
                    joined.append((nxt, packet, self.transport.broadcast(packet, self.last)))

        def signal_of(mb: MicroBatch) -> OutputSignal:
            join(mb.index)
            while mb.index not in signals:
                nxt, packet, handle = joined.popleft()
                with trace.span("broadcast wait", "comm", mb=nxt.index):
                    handle.wait()
                    mb_stats, (signals[nxt.index],) = codec.unpack(packet, [nxt], batch.y,
                                                                   batch.offset)
                stats.add_(mb_stats)
            return signals[mb.index]

        for mb in mbs:
            for s, rule in stages:
                mb_stats = stats  # only the last stage adds: a fresh buffer per micro-batch
                if s == self.last:
                    with self.transport.stage(s):
                        mb_stats = torch.zeros_like(stats)
                signal = self._forward(s, rule, mb, batch, mb_stats)
                if signal is not None:
                    with self.transport.stage(s):
                        stats.add_(mb_stats)
                    signals[mb.index] = signal
                    if not local:
                        with trace.span("broadcast", "comm", root=self.last, mb=mb.index):
                            packet = codec.pack(mb_stats, [signal])
                            # Keep the packet alive until its broadcast has completed.
                            posted.append((packet, self.transport.broadcast(packet,
                                                                            self.last)))
                waiting[s].append(mb)
                while len(waiting[s]) > self.last - s:
                    done = waiting[s].popleft()
                    self._backward(s, rule, done, signal_of(done))
            if not local and mb.index not in signals:
                join(mb.index)  # its signal arrives while this rank forwards the next ones
        for s, rule in stages:
            while waiting[s]:
                done = waiting[s].popleft()
                self._backward(s, rule, done, signal_of(done))
        # The root's broadcasts complete while the updates run (`_finish` waits after them).
        return self._finish(stages, stats, batch, posted,
                            unreceived_signals=len(mbs) - len(signals))


class SequentialBackward(Schedule):
    """BP, FA and calibration: all forwards, then the backward stage by stage in reverse."""

    name = "sequential-backward"

    def run(self, stages, batch):
        stats = self._stats()
        signals: dict[int, OutputSignal] = {}
        for mb in batch.mbs:
            for s, rule in stages:
                signal = self._forward(s, rule, mb, batch, stats)
                if signal is not None:
                    signals[mb.index] = signal
        for mb in reversed(batch.mbs):
            for s, rule in reversed(stages):
                with self.transport.stage(s):
                    grad = None
                    if s != self.last:
                        with trace.span("recv", "comm", src=s + 1, dst=s):
                            grad = self.transport.recv(s + 1, s, _key("grad", rule, mb))[0]
                    with trace.span("backward", stage=s, mb=mb.index):
                        g_in = rule.backward(mb, signals.pop(mb.index, None) if s == self.last
                                             else None, grad)
                    if s != 0:
                        with trace.span("send", "comm", src=s, dst=s - 1):
                            self.transport.send([g_in], s, s - 1, _key("grad", rule, mb))
        if not self.transport.local_only:
            # Every stage reports the loss: the last stage's statistics reach the others.
            with trace.span("broadcast", "comm", root=self.last):
                handle = self.transport.broadcast(stats, self.last)
            with trace.span("broadcast wait", "comm"):
                handle.wait()
        return self._finish(stages, stats, batch, unused_signals=len(signals))


class Inference:
    """Forward only (evaluation): chunks of rows through the stages, (summed loss, correct)
    summed over every rank."""

    def __init__(self, transport: Transport, num_stages: int, device: torch.device) -> None:
        self.transport = transport
        self.last = num_stages - 1
        self.device = device

    @torch.no_grad()
    def run(self, stages: LocalStages, x: torch.Tensor, y: torch.Tensor,
            starts: list[int], batch_size: int,
            prepare: Prepare | None = None) -> tuple[float, int]:
        stats = torch.zeros(2, dtype=torch.float64, device=self.device)
        prepare = prepare or (lambda rows: rows.to(self.device))
        for start in starts:
            key = message_key("infer", len(y[start:start + batch_size]))
            for s, rule in stages:
                h = prepare(x[start:start + batch_size]) if s == 0 else \
                    self.transport.recv(s - 1, s, key)[0]
                h = rule.infer(h)
                if s != self.last:
                    self.transport.send([h], s, s + 1, key)
                else:
                    labels = y[start:start + batch_size].to(self.device).long()
                    loss, correct, _ = output_signal(h, labels, 1, None)
                    stats += torch.stack([loss.to(stats.dtype), correct.to(stats.dtype)])
        self.transport.flush()
        self.transport.check_idle("end of evaluation")
        self.transport.all_reduce(stats)  # only the last stages hold non-zero sums
        return float(stats[0]), int(stats[1])
