"""Backpropagation and Feedback Alignment: exact (or FA-modified) sequential backward.

BP is autograd through the stage; across stages the runtime passes the input gradient of one
stage to the previous one. The same code serves GrAPE's and DFA's calibration step, with its own
optimiser. FA is BP on a copy of the layers whose backward uses a fixed random matrix of the
weight's shape in place of the weight when propagating to the layer's input (Lillicrap 2016);
the weight gradient is unchanged.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..models import Block
from ..rng import keyed_generator
from .base import MicroBatch, OutputSignal, Reduce, StageRule, no_reduce


class BackpropRule(StageRule):
    """Exact BP through the stage (or FA's modified chain after `convert_to_fa`).

    `fresh_optimizer_state`: forget the optimiser's state (momentum, Adam moments) before each
    step. The paper's calibration step uses it: one BP step on one mini-batch, epochs apart,
    must not re-apply the gradients of the previous calibration through a stale momentum buffer.

    `max_update` > 0: a trust bound on each step. Every parameter tensor W moves by at most
    `max_update * |W|` (Frobenius norms); a longer step is scaled back along its own direction.
    The bound depends only on the step and the weights, so every replica applies the same one.
    """

    sequential_backward = True

    def __init__(
        self, blocks: list[Block], first: int, num_blocks: int, optimizer: torch.optim.Optimizer,
        *, name: str = "bp", reduce: Reduce = no_reduce, fresh_optimizer_state: bool = False,
        max_update: float = 0.0,
    ) -> None:
        super().__init__(blocks, first, num_blocks, optimizer, reduce)
        self.name = name
        self.fresh_optimizer_state = fresh_optimizer_state
        self.max_update = max_update
        self._stash: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(self, mb: MicroBatch, x: torch.Tensor, tangents: torch.Tensor | None = None):
        # A stage's input is a leaf: the first stage's is data, a later stage's gradient is
        # handed back to the previous stage by the schedule.
        x_in = x.detach().requires_grad_(self.first > 0)
        with torch.enable_grad():
            y = x_in
            for block in self.blocks:
                y = block(y)
        self._stash[mb.index] = (x_in, y)
        return y, None

    def backward(self, mb: MicroBatch, signal: OutputSignal | None,
                 grad_output: torch.Tensor | None):
        x_in, y = self._stash.pop(mb.index)
        if grad_output is None:
            if signal is None:
                raise ValueError("the last stage's backward needs the output signal")
            grad_output = signal.error.reshape(y.shape)  # per position for a language model
        torch.autograd.backward(y, grad_output)
        return x_in.grad if x_in.requires_grad else None

    def finish_step(self) -> dict[str, float]:
        if self._stash:
            raise RuntimeError(f"{len(self._stash)} micro-batches got no backward this step")
        if self.fresh_optimizer_state:
            self.optimizer.state.clear()
        before = [p.detach().clone() for p in self.parameters()] if self.max_update else []
        self._apply_update()
        with torch.no_grad():
            for p, w in zip(self.parameters(), before):
                step = p - w
                limit = self.max_update * w.norm()
                size = step.norm()
                if size > limit:
                    p.copy_(w + step * (limit / size))
        return {}


# ---------------------------------------------------------------------------------------------
# Feedback Alignment


class _FALinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, feedback):
        ctx.save_for_backward(x, feedback)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, feedback = ctx.saved_tensors
        grad_in = grad_out @ feedback  # B in place of W
        grad_w = grad_out.reshape(-1, grad_out.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        grad_b = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.has_bias else None
        return grad_in, grad_w, grad_b, None


class _FAConv2dFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, feedback, stride, padding, dilation, groups):
        ctx.save_for_backward(x, feedback)
        ctx.conf = (stride, padding, dilation, groups)
        ctx.has_bias = bias is not None
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        x, feedback = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        grad_in = torch.nn.grad.conv2d_input(x.shape, feedback, grad_out, stride, padding,
                                             dilation, groups)
        grad_w = torch.nn.grad.conv2d_weight(x, feedback.shape, grad_out, stride, padding,
                                             dilation, groups)
        grad_b = grad_out.sum((0, 2, 3)) if ctx.has_bias else None
        return grad_in, grad_w, grad_b, None, None, None, None, None


class FALinear(nn.Linear):
    feedback: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _FALinearFn.apply(x, self.weight, self.bias, self.feedback)


class FAConv2d(nn.Conv2d):
    feedback: torch.Tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding_mode != "zeros":
            raise ValueError("FA conv supports padding_mode='zeros' only")
        return _FAConv2dFn.apply(x, self.weight, self.bias, self.feedback, self.stride,
                                 self.padding, self.dilation, self.groups)


def convert_to_fa(blocks: list[Block], first: int, seed: int) -> None:
    """Turn every Linear/Conv2d of `blocks` into its FA version, in place (same parameters).

    Each feedback matrix has the weight's shape and the weight's default init scale, drawn
    from a stream keyed by (seed, block, layer) so any partition of the model draws the same.
    """
    for bi, block in enumerate(blocks):
        for li, layer in enumerate(block.modules()):
            if type(layer) in (nn.Linear, nn.Conv2d):
                gen = keyed_generator(seed, "fa", first + bi, li)
                fan_in = math.prod(layer.weight.shape[1:])
                bound = 1 / math.sqrt(fan_in)
                fb = (torch.rand(layer.weight.shape, generator=gen) * 2 - 1) * bound
                layer.__class__ = FALinear if type(layer) is nn.Linear else FAConv2d
                layer.register_buffer("feedback", fb.to(layer.weight.device))
