"""PEPITA (Dellaferrera & Kreiman 2022): two forward passes, no backward.

Pass one computes h_l and the error e = softmax(y_hat) - onehot. Pass two runs on the modulated
input x_err = x - F e (F fixed random, input_dim x d_out). Updates (descent directions):
hidden block l: dW_l = (h_l - h_l^err) (h_{l-1}^err)^T; output block: dW_L = e (h_{L-1}^err)^T,
averaged over the mini-batch. Defined for blocks of the form [Flatten] Linear [activation].
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..models import Block
from ..rng import keyed_generator
from .base import MicroBatch, OutputSignal, Reduce, StageRule, accumulate_grad, no_reduce


def _split_linear(block: Block) -> tuple[list[nn.Module], nn.Linear, list[nn.Module]]:
    layers = list(block)
    lin = [i for i, layer in enumerate(layers) if isinstance(layer, nn.Linear)]
    if len(lin) != 1 or any(any(True for _ in m.parameters()) for m in layers if
                            not isinstance(m, nn.Linear)):
        raise ValueError(f"pepita needs blocks made of one Linear layer; '{block.name}' is not")
    i = lin[0]
    return layers[:i], layers[i], layers[i + 1:]


class PepitaRule(StageRule):
    name = "pepita"
    second_pass = True

    def __init__(self, blocks: list[Block], first: int, num_blocks: int,
                 optimizer: torch.optim.Optimizer, input_shape: tuple[int, ...], d_out: int,
                 f_scale: float, seed: int, reduce: Reduce = no_reduce) -> None:
        super().__init__(blocks, first, num_blocks, optimizer, reduce)
        self.parts = [_split_linear(b) for b in blocks]
        self.input_shape = input_shape
        d_in = math.prod(input_shape)
        bound = f_scale * math.sqrt(6 / d_in)
        self.F = ((torch.rand(d_in, d_out, generator=keyed_generator(seed, "pepita_F")) * 2 - 1)
                  * bound).to(self.device)
        self._stash: dict[int, tuple[torch.Tensor, list[torch.Tensor]]] = {}

    @torch.no_grad()
    def forward(self, mb: MicroBatch, x: torch.Tensor, tangents=None):
        outs = []
        x_in = x
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        self._stash[mb.index] = (x_in, outs)
        return x, None

    def backward(self, mb: MicroBatch, signal: OutputSignal, grad_output=None):
        return None

    @torch.no_grad()
    def modulated_forward(self, mb: MicroBatch, signal: OutputSignal, x_err):
        x_in, outs = self._stash.pop(mb.index)
        if self.first == 0:
            raw_error = signal.error * signal.total  # softmax - onehot, per sample
            x_err = x_in - (raw_error @ self.F.T).reshape(x_in.shape)
        for offset, (pre, lin, post) in enumerate(self.parts):
            i = self.first + offset
            for layer in pre:
                x_err = layer(x_err)
            a_err = lin(x_err)
            h_err = a_err
            for layer in post:
                h_err = layer(h_err)
            delta = signal.error if self.is_output(i) else (outs[offset] - h_err) / signal.total
            accumulate_grad(lin.weight, delta.T @ x_err)
            if lin.bias is not None:
                accumulate_grad(lin.bias, delta.sum(0))
            x_err = h_err
        return x_err

    def finish_step(self) -> dict[str, float]:
        if self._stash:
            raise RuntimeError("pepita: a micro-batch got no modulated pass this step")
        self._apply_update()
        return {}
