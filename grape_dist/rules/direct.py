"""The direct-feedback rules: DFA, DRTP and GrAPE (paper eq. 2, section 3, Algorithm 1).

Every hidden block l receives a signal projected straight from the output,
`delta_h_l = s @ B_l` with `s` the output error `e` (DFA, GrAPE) or minus the one-hot target
(DRTP), and backpropagates it only through its own layers (its input is detached). The output
block is trained with the true error. No gradient crosses a block boundary, so the blocks of all
stages update concurrently once the signal is broadcast.

GrAPE is this rule with a `FeedbackLearner` (`grape.py`): it carries tangents during the forward
pass, accumulates J_hat when the signal arrives, and refines every B_l before the update.

Synchronous semantics: the B step uses J_hat summed over all micro-batches of the mini-batch and
the weight update is applied once per mini-batch, so any number of stages and micro-batches
follows the same trajectory. With `streaming`, each micro-batch's local backward runs as soon as
its signal arrives (its activations are freed at once), with B from before this mini-batch's B
step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import trace
from ..models import Block, FeedbackPoint
from . import feedback as fb
from .base import MicroBatch, OutputSignal, Reduce, StageRule, accumulate_grad, no_reduce
from .grape import FeedbackLearner
from .points import LocalUpdate, tapped_forward
from .tangents import Rows, block_forward, layer_forward


@dataclass
class _Stash:
    """What one micro-batch leaves on this stage until its signal arrives."""

    outputs: list[torch.Tensor] = field(default_factory=list)  # block outputs, with local graphs
    dense: dict[int, torch.Tensor] = field(default_factory=dict)  # dense blocks' Linear inputs
    directions: dict[int, torch.Tensor] = field(default_factory=dict)  # GrAPE: tangents p_l
    layers: dict[int, list[LocalUpdate]] = field(default_factory=dict)  # layer points' blocks
    signal: OutputSignal | None = None
    head_input: torch.Tensor | None = None  # head_signal: the head's input (a leaf)
    head_done: bool = False  # head_signal: the head's gradient is already accumulated


class DirectFeedbackRule(StageRule):
    """DFA (`signal='error'`), DRTP (`signal='target'`); GrAPE when a `learner` is given.

    `points`: the model's feedback points (`BlockModel.feedback_points`): one per hidden
    block, or with layer feedback one per weight layer of the blocks that have taps (the stage's
    own are those it is given a B for).
    `feedback`: B_p (d_out x n_p) for every point, by the point's global index; with a learner
    these are the same parameters the learner refines.

    `head_signal` (language models, Launay et al. 2020): the signal is the error at the output
    block's input, from the exact backward of the head, and the tangents stop there; B_l is then
    d_model x d_model, shared over positions.
    """

    def __init__(
        self,
        blocks: list[Block],
        first: int,
        num_blocks: int,
        optimizer: torch.optim.Optimizer,
        feedback: dict[int, nn.Parameter],
        *,
        points: list[FeedbackPoint],
        name: str,
        signal: str = "error",
        learner: FeedbackLearner | None = None,
        streaming: bool = False,
        head_signal: bool = False,
        reduce: Reduce = no_reduce,
    ) -> None:
        super().__init__(blocks, first, num_blocks, optimizer, reduce)
        if signal not in ("error", "target"):
            raise ValueError(f"signal must be 'error' or 'target', got {signal!r}")
        if head_signal and signal == "target":
            raise ValueError("DRTP projects one-hot targets, which have no head-input form; "
                             "use dfa or grape for a language model")
        self.head_signal = head_signal
        self.name = name
        self.signal_kind = signal
        self.B = feedback
        self.all_points = points
        self.points = [points[i] for i in sorted(feedback)]  # this stage's: those it holds B for
        self._points_of: list[list[FeedbackPoint]] = [[] for _ in blocks]
        for pt in self.points:
            self._points_of[pt.block - first].append(pt)
        self.learner = learner
        self.streaming = streaming
        # Blocks whose local update has a closed form (Linear + activation): updated in one
        # GEMM over all micro-batches instead of one autograd backward per micro-batch.
        self._dense = [_dense_parts(b) for b in blocks]
        self._stash: dict[int, _Stash] = {}

    def feedback_matrices(self) -> dict[int, torch.Tensor]:
        return {i: b.detach() for i, b in self.B.items()}

    def state_parameters(self) -> list[tuple[str, torch.Tensor]]:
        # GrAPE's B are trained (with their optimiser); DFA's and DRTP's fixed B are saved as
        # feedback matrices only.
        learned = [] if self.learner is None else \
            [(f"feedback.{i}", b) for i, b in sorted(self.learner.B.items())]
        return super().state_parameters() + learned

    def state_optimizers(self) -> list[torch.optim.Optimizer]:
        extra = [] if self.learner is None or self.learner.optimizer is None else \
            [self.learner.optimizer]
        return super().state_optimizers() + extra

    def feedback_points(self) -> list[FeedbackPoint]:
        return list(self.points)

    # -- forward ---------------------------------------------------------------------------

    def forward(self, mb: MicroBatch, x: torch.Tensor, tangents: torch.Tensor | None):
        stash = _Stash()
        self._stash[mb.index] = stash
        k0, k1, rows = self.learner.rows(mb, x.device) if self.learner is not None \
            else (0, 0, None)
        for offset, block in enumerate(self.blocks):
            i = self.first + offset
            x_in = x.detach()
            points = self._points_of[offset]
            if points and points[0].tap is not None:
                # Layer points: each weight layer's point gets its tangent inside the block.
                y, tangents, stash.layers[offset] = tapped_forward(
                    block, x_in, tangents, rows, self._injector(mb, k0, k1, points, stash))
                stash.outputs.append(y)
                x = y
                continue
            if self.head_signal and self.is_output(i):
                # The tangents stop at the head's input, where the signal is taken.
                x_in.requires_grad_(True)
                with torch.enable_grad():
                    y = block(x_in)
                stash.head_input = x_in
            elif self._dense[offset] is not None:
                y, tangents = self._dense_forward(offset, x_in, tangents, rows, stash)
            else:
                with torch.enable_grad():
                    y, tangents = block_forward(block, x_in, tangents, rows)
            if points:
                tangents = self._injector(mb, k0, k1, points, stash)(0, tangents)
            stash.outputs.append(y)
            x = y
        return x.detach(), tangents

    def _injector(self, mb: MicroBatch, k0: int, k1: int, points: list[FeedbackPoint],
                  stash: _Stash):
        """inject(j, u): the tangent bundle `u` at the block's j-th point plus that point's
        tangent (GrAPE; unchanged for the other rules or without tangent rows)."""
        def inject(j: int, u: torch.Tensor | None) -> torch.Tensor | None:
            if self.learner is None:
                return u
            pt = points[j]
            p = self.learner.draw(pt.index, mb, k0, k1, self._direction_shape(pt),
                                  self.B[pt.index].device)
            if p is None:
                return u
            stash.directions[pt.index] = p
            # A channel-shared B: one number per channel, repeated over positions.
            return self.learner.route(u, p.expand(len(p), *pt.shape))
        return inject

    @torch.no_grad()
    def _dense_forward(self, offset: int, x: torch.Tensor, tangents, rows: Rows | None,
                       stash: _Stash):
        """A [Flatten] Linear [ReLU|Tanh] block without an autograd graph: its update is
        computed in closed form over all micro-batches at once (`_dense_update`)."""
        pre, linear, act = self._dense[offset]
        for layer in pre:
            x, tangents = layer_forward(layer, x, tangents, rows)
        y, tangents = layer_forward(linear, x, tangents, rows)
        if act is not None:
            y, tangents = layer_forward(act, y, tangents, rows)
        stash.dense[offset] = x
        return y, tangents

    def _direction_shape(self, pt: FeedbackPoint) -> tuple[int, ...]:
        """The shape of a point's tangent per row: the point's, or (C, 1, 1) when its B has
        one column per channel of a (C, H, W) point."""
        shape = pt.shape
        if len(shape) == 3 and self.B[pt.index].shape[1] == shape[0] != math.prod(shape):
            return (shape[0], 1, 1)
        return shape

    # -- signal and update -------------------------------------------------------------------

    def backward(self, mb: MicroBatch, signal: OutputSignal | None, grad_output=None):
        if signal is None:
            raise ValueError(f"{self.name} needs the broadcast output signal")
        stash = self._stash[mb.index]
        stash.signal = signal
        if self.learner is not None:
            for i, p in stash.directions.items():
                self.learner.accumulate(i, signal.tangents, p)
        if self.streaming:
            # Update now and free this micro-batch's activations; GrAPE's B step waits for
            # the end of the mini-batch, so this update uses the previous step's B.
            with trace.span("local update"):
                self._local_backward([self._stash.pop(mb.index)])
        return None

    def signal_at_output(self, mb: MicroBatch, signal: OutputSignal) -> OutputSignal:
        """head_signal: backpropagate the logits' error through the head (its weight gradient is
        the output block's update) and broadcast the error at the head's input."""
        if not self.head_signal:
            return signal
        stash = self._stash[mb.index]
        y, x_in = stash.outputs[-1], stash.head_input
        torch.autograd.backward(y, signal.error.reshape(y.shape))
        error = x_in.grad.reshape(-1, x_in.shape[-1])
        stash.head_input, stash.head_done = None, True
        return OutputSignal(error, signal.target, signal.tangents, signal.total)

    def output_tangent_shape(self, mb: MicroBatch) -> tuple[int, int] | None:
        return self.learner.output_tangent_shape(mb) if self.learner is not None else None

    def held_tensors(self) -> list[object]:
        held = super().held_tensors()
        return held + self.learner.held_tensors() if self.learner is not None else held

    def reset_step(self) -> None:
        super().reset_step()
        if self.learner is not None:
            self.learner.reset()

    def _projection_source(self, signal: OutputSignal) -> torch.Tensor:
        if self.signal_kind == "target":
            # DRTP: the sign-concordant part of e = softmax - onehot, scaled like e.
            return -signal.target / signal.total
        return signal.error

    def finish_step(self) -> dict[str, torch.Tensor | float]:
        stats = {}
        if self.learner is not None:
            with trace.span("B step"):
                stats = self.learner.step()
        with trace.span("local update"):
            self._local_backward(list(self._stash.values()))
        self._stash = {}
        self._apply_update()
        return stats

    def _local_backward(self, stashes: list[_Stash]) -> None:
        """Each block's projected signal, backpropagated through that block only."""
        outputs, grads = [], []
        dense: dict[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {}
        for stash in stashes:
            if stash.signal is None:
                raise RuntimeError("a micro-batch got no output signal before finish_step")
            src = self._projection_source(stash.signal)
            for offset, y in enumerate(stash.outputs):
                i = self.first + offset
                if offset in stash.layers:
                    feedback = [self.B[pt.index] for pt in self._points_of[offset]]
                    for update in stash.layers[offset]:
                        for out, grad in update.grads(src, feedback[:update.taps]):
                            outputs.append(out)
                            grads.append(grad)
                        feedback = feedback[update.taps:]
                    continue
                if self.is_output(i):
                    if stash.head_done:
                        continue
                    delta = stash.signal.error.reshape(y.shape)
                else:
                    delta = fb.project(src, self.B[self._points_of[offset][0].index], y.shape)
                if offset in stash.dense:
                    dense.setdefault(offset, []).append((stash.dense[offset], y, delta))
                else:
                    outputs.append(y)
                    grads.append(delta)
        if outputs:
            torch.autograd.backward(outputs, grads)
        for offset, parts in dense.items():
            self._dense_update(offset, *(t[0] if len(t) == 1 else torch.cat(t)
                                         for t in zip(*parts)))

    @torch.no_grad()
    def _dense_update(self, offset: int, x: torch.Tensor, y: torch.Tensor,
                      delta: torch.Tensor) -> None:
        """The local backward of a dense block over all its micro-batches in one GEMM:
        delta_a = delta_h * act'(a) (from the output y), dW = delta_a^T x, db = sum delta_a."""
        _, linear, act = self._dense[offset]
        # The activation derivatives autograd itself uses, from the output y.
        if isinstance(act, nn.ReLU):
            delta = torch.ops.aten.threshold_backward(delta, y, 0)
        elif isinstance(act, nn.Tanh):
            delta = torch.ops.aten.tanh_backward(delta, y)
        w = linear.weight
        if w.grad is None:
            w.grad = delta.T @ x
        else:
            w.grad.addmm_(delta.T, x)  # in place: no temporary of the weight's size
        if linear.bias is not None:
            accumulate_grad(linear.bias, delta.sum(0))


def _dense_parts(block: nn.Module):
    """(flatten layers, Linear, activation or None) for blocks of the form
    [Flatten...] Linear [ReLU | Tanh] on 2-D activations; None for anything else."""
    if not isinstance(block, nn.Sequential):
        return None
    layers = list(block)
    pre = []
    while layers and isinstance(layers[0], nn.Flatten) and layers[0].end_dim == -1 \
            and layers[0].start_dim == 1:
        pre.append(layers.pop(0))
    if not layers or type(layers[0]) is not nn.Linear:
        return None
    linear = layers.pop(0)
    act = layers.pop(0) if layers and type(layers[0]) in (nn.ReLU, nn.Tanh) else None
    if layers or (act is not None and getattr(act, "inplace", False)):
        return None
    return pre, linear, act
