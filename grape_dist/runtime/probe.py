"""The alignment probe's schedule: the exact derivatives that the feedback matrices are judged by.

It runs like a BP step that does not step, on one probe batch:
- a forward through this rank's stages with autograd graphs, and one probe tangent stream per
  feedback point (keyed by (seed, point), so any layout draws the same) carried to the output;
- at the last stage the output signal (the loss's error, or for a language model the error at
  the head's input, and the probe tangents at the output), broadcast to every stage in the
  signal codec's packet like a training step's;
- the gradients of the loss, and for classifiers with at most `max_outputs` outputs of each
  output unit summed over the batch, passed back stage by stage.

For every feedback point a stage holds, the caller's `measure` gets a `PointDerivatives` and
returns scalars (metrics/alignment.py: the cosines); only those leave the rank.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..models.dropout import dropout_rows
from ..rng import keyed_generator
from ..rules import OutputSignal, SignalSpec, output_signal
from ..rules.points import tap_outputs, tapped_forward
from ..rules.tangents import block_forward
from .schedules import Batch, LocalStages, Schedule, StepResult, _key
from .signals import SignalCodec
from .transport import Transport


@dataclass
class PointDerivatives:
    """At feedback point l (`index`, `name`) on the probe batch of n samples:
    - `feedback`: its matrix B_l;
    - `error`: the broadcast error e (n x positions rows, signal-width columns);
    - `grad`: the true gradient dL/dh_l of the mean loss (n x the point's shape);
    - `jacobian`: per output unit u, d(sum over samples of y_u)/dh_l as a row (units x n_l),
      or None when not measured;
    - `tangent`, `output_tangent`: the probe tangent drawn at the point (n x its shape) and its
      image at the output (n x the output tangents' tail);
    - `positions`: output positions per sample (a language model's tokens; 1 for classifiers).
    """

    index: int
    name: str
    feedback: torch.Tensor
    error: torch.Tensor
    grad: torch.Tensor
    jacobian: torch.Tensor | None
    tangent: torch.Tensor
    output_tangent: torch.Tensor
    positions: int


Measure = Callable[[PointDerivatives], dict[str, float]]


class AlignmentProbe(Schedule):
    """`run(stages, batch)`: one probe batch (one micro-batch, whose `step` is the probe's seed)
    through this rank's stages of a direct rule; returns its loss and, in `stats`, each local
    point's measures as `<point name>/<measure>`. Nothing is updated; BatchNorm running
    statistics move as in a training forward (the engine puts them back)."""

    name = "alignment-probe"

    def __init__(self, transport: Transport, num_stages: int, spec: SignalSpec,
                 device: torch.device, measure: Measure, max_outputs: int) -> None:
        super().__init__(transport, num_stages, spec, device)
        self.measure = measure
        self.max_outputs = max_outputs

    @torch.no_grad()
    def run(self, stages: LocalStages, batch: Batch) -> StepResult:
        (mb,) = batch.mbs
        rule0 = stages[0][1]
        points = rule0.all_points
        n, spec = mb.size, self.spec
        num_blocks = rule0.num_blocks
        stats = torch.zeros(2, dtype=torch.float64, device=self.device)
        # Forward: block outputs with their graphs, and one probe tangent stream per point.
        saved = {}
        for s, rule in stages:
            if s == 0:
                h, t = batch.x.to(self.device), None
            else:
                h, t = self.transport.recv(s - 1, s, _key("probe/fwd", rule, mb))
            x_in = h.detach().requires_grad_(s > 0)
            h, outs, head_in = x_in, [], None
            with torch.enable_grad(), dropout_rows(mb.step, mb.start, mb.size, mb.total,
                                                   stream="probe"):
                for offset, block in enumerate(rule.blocks):
                    i = rule.first + offset
                    if spec.at_head_input and i == num_blocks - 1:
                        head_in = h  # the tangents and the signal stop here
                        h = block(h)
                        continue
                    here = [pt for pt in points if pt.block == i]
                    h, t, drawn = self._block(block, h, t, here, mb.step, n)
                    outs += [(pt, v, p) for pt, (v, p) in zip(here, drawn)]
            saved[s] = [x_in, outs, h, t, head_in]
            if s != self.last:
                self.transport.send([h.detach(), t], s, s + 1, _key("probe/fwd", rule, mb))
        # The output signal, from the last stage to every stage (the codec's packet: the loss's
        # statistics, the error, then one output tangent per point).
        codec = SignalCodec(rule0, spec, self.device,
                            tangent_shape=lambda m: (len(points), m.size))
        if self._holds_last(stages):
            _, _, logits, t, head_in = saved[self.last]
            loss, correct, signal = output_signal(logits, batch.y.to(self.device), n, t)
            stats += torch.stack([loss.to(stats.dtype), correct.to(stats.dtype)])
            if spec.at_head_input:
                # The error at the head's input (the head's exact backward); the probe's
                # backward then starts there.
                with torch.enable_grad():
                    e = torch.autograd.grad(logits, head_in,
                                            signal.error.reshape(logits.shape))[0]
                signal = OutputSignal(e.reshape(-1, e.shape[-1]), signal.target, t, n)
                saved[self.last][2] = head_in
            packet = codec.pack(stats, [signal])
        else:
            packet = codec.empty(batch.mbs)
        self.transport.broadcast(packet, self.last).wait()
        if not self._holds_last(stages):
            stats, (signal,) = codec.unpack(packet, batch.mbs, batch.y, batch.offset)
        measures = self._backward(stages, saved, mb, signal)
        self.transport.flush()
        self.transport.check_idle(f"end of mini-batch ({self.name})")
        return StepResult(float(stats[0]), int(stats[1]), n, measures)

    def _block(self, block, h, t, here, seed: int, n: int):
        """One block's forward with its points' probe tangents added: (output, tangents,
        [(the point's value, its drawn tangent)])."""
        drawn = []

        def inject(j: int, u: torch.Tensor | None) -> torch.Tensor:
            gen = keyed_generator(seed, "probe", here[j].index)
            p = torch.randn(n, *here[j].shape, generator=gen).to(self.device)
            drawn.append(p)
            return p.unsqueeze(0) if u is None else torch.cat([u, p.unsqueeze(0)])

        if here and here[0].tap is not None:
            # Layer points: the exact gradients at the points need the whole block's graph;
            # the tangents come from the rules' own forward.
            h_out, values = tap_outputs(block, h)
            _, t, _ = tapped_forward(block, h.detach(), t, None, inject)
        else:
            h_out, t = block_forward(block, h, t)
            values = [h_out]
            if here:
                t = inject(0, t)
        return h_out, t, list(zip(values, drawn))

    def _backward(self, stages: LocalStages, saved: dict, mb,
                  signal: OutputSignal) -> dict[str, float]:
        """The loss's gradient (grad output e) and, for the exact Jacobian, each output unit
        summed over the batch (grad output one-hot in that unit), stage by stage in reverse;
        each local point measured."""
        spec, n = self.spec, mb.size
        c = spec.signal_width
        e = signal.error
        g = signal.tangents
        units = c if c <= self.max_outputs and spec.positions == 1 else 0
        out: dict[str, float] = {}
        for s, rule in reversed(stages):
            x_in, outs, y_out, _, _ = saved[s]
            if s == self.last:
                eye = torch.eye(c, dtype=e.dtype, device=self.device)
                grads_out = [e.reshape(y_out.shape), *eye[:units, None, :].expand(units, n, c)]
            else:
                grads_out = self.transport.recv(s + 1, s, _key("probe/back", rule, mb))[0]
            inputs = [v for _, v, _ in outs] + ([x_in] if s > 0 else [])
            true_grads, jac, back = None, [[] for _ in outs], []
            with torch.enable_grad():
                for r, go in enumerate(grads_out):
                    gs = torch.autograd.grad(y_out, inputs, go,
                                             retain_graph=r < len(grads_out) - 1,
                                             allow_unused=True)
                    if r == 0:
                        true_grads = gs
                    else:
                        for b in range(len(outs)):
                            jac[b].append(gs[b].reshape(n, -1).sum(0))
                    if s > 0:
                        back.append(gs[-1])
            if s > 0:
                self.transport.send([torch.stack(back)], s, s - 1,
                                    _key("probe/back", rule, mb))
            feedback = rule.feedback_matrices()
            for b, (pt, _, p) in enumerate(outs):
                here = PointDerivatives(
                    pt.index, pt.name, feedback[pt.index], e, true_grads[b],
                    torch.stack(jac[b]) if units else None, p, g[pt.index], spec.positions)
                for k, v in self.measure(here).items():
                    out[f"{pt.name}/{k}"] = v
        return out
