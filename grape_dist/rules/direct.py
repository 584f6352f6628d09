"""The direct-feedback rules: DFA, DRTP and GrAPE (paper eq. 2, section 3, Algorithm 1).

Every hidden block l receives a signal projected straight from the output,
`delta_h_l = s @ B_l` with `s` the output error `e` (DFA, GrAPE) or minus the one-hot target
(DRTP), and backpropagates it only through its own layers (its input is detached). The output
block is trained with the true error. No gradient crosses a block boundary, so the blocks of all
stages update concurrently once the signal is broadcast.

GrAPE additionally learns B_l: during the forward pass it perturbs each hidden block with a
Gaussian tangent, pushes the tangents to the output by forward-mode AD (`tangents.py`), forms the
rank-1 Jacobian estimate J_hat_l = sum_s g_s p_s^T, takes one optimiser step on
L_align = 1 - mean_k cos(B_l[:, k], J_hat_l[:, k]) (gradient: eq. 17), renormalises the columns
of B_l, and only then applies the DFA update with the refined B_l.

Synchronous semantics: the B step uses J_hat summed over all micro-batches of the mini-batch and
the weight update is applied once per mini-batch, so any number of stages and micro-batches
follows the same trajectory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import GrapeConfig
from ..models import Block
from ..rng import keyed_generator
from . import feedback as fb
from .base import MicroBatch, OutputSignal, StageRule, accumulate_grad
from .tangents import block_forward, layer_forward


@dataclass
class _Stash:
    """What one micro-batch leaves on this stage until its signal arrives."""

    outputs: list[torch.Tensor] = field(default_factory=list)  # block outputs, with local graphs
    dense: dict[int, torch.Tensor] = field(default_factory=dict)  # dense blocks' Linear inputs
    # GrAPE: per hidden block, the tangent direction p (activation space) or u / (|x|^2+1)
    # (weight space), on the first m samples.
    directions: dict[int, torch.Tensor] = field(default_factory=dict)
    signal: OutputSignal | None = None


class DirectFeedbackRule(StageRule):
    """DFA (`signal='error'`), DRTP (`signal='target'`); GrAPE when `grape` is given."""

    def __init__(
        self,
        blocks: list[Block],
        first: int,
        num_blocks: int,
        optimizer: torch.optim.Optimizer,
        feedback: dict[int, torch.Tensor],
        signal: str = "error",
        grape: GrapeConfig | None = None,
        b_optimizer_factory=None,
        seed: int = 0,
        name: str = "dfa",
    ) -> None:
        super().__init__(blocks, first, num_blocks)
        self.name = name
        self.optimizer = optimizer
        self.signal_kind = signal
        self.grape = grape
        self.seed = seed
        # B_l as leaf parameters so that a torch optimiser can step them; they never enter an
        # autograd graph (gradients come from the closed form of eq. 17).
        self.B = {i: nn.Parameter(b.clone().to(self.device), requires_grad=False)
                  for i, b in feedback.items()}
        self.b_optimizer = None
        self.space: dict[int, str] = {}
        if grape is not None and self.B:
            self.b_optimizer = b_optimizer_factory(list(self.B.values()))
            self.space = {i: _choose_space(blocks[i - first], grape.tangent_space) for i in self.B}
        # Blocks whose local update has a closed form (Linear + activation): updated in one
        # GEMM over all micro-batches instead of one autograd backward per micro-batch.
        self._dense = [_dense_parts(b) for b in blocks]
        self._stash: dict[int, _Stash] = {}
        self._jhat: dict[int, torch.Tensor] = {}
        self._noise_step = -1
        self._noise: dict[int, torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = {}

    def feedback_matrices(self) -> dict[int, torch.Tensor]:
        return {i: b.detach() for i, b in self.B.items()}

    # -- forward ---------------------------------------------------------------------------

    def forward(self, mb: MicroBatch, x: torch.Tensor, tangents: torch.Tensor | None):
        stash = _Stash()
        self._stash[mb.index] = stash
        m = mb.size if not self.grape or not self.grape.tangent_samples else min(
            mb.size, self.grape.tangent_samples)
        for offset, block in enumerate(self.blocks):
            i = self.first + offset
            x_in = x.detach()
            weight_space = i in self.B and self.grape is not None and self.space[i] == "weight"
            if self._dense[offset] is not None and not weight_space:
                y, tangents = self._dense_forward(offset, x_in, tangents, stash)
            else:
                with torch.enable_grad():
                    if weight_space:
                        y, tangents = self._weight_space_forward(block, i, mb, x_in, tangents,
                                                                 m, stash)
                    else:
                        y, tangents = block_forward(block, x_in, tangents)
            if i in self.B and self.grape is not None and self.space[i] == "activation":
                p = self._activation_noise(i, mb, block.out_shape)[:m]
                stash.directions[i] = p
                tangents = self._route(tangents, p)
            stash.outputs.append(y)
            x = y
        return x.detach(), tangents

    @torch.no_grad()
    def _dense_forward(self, offset: int, x: torch.Tensor, tangents, stash: _Stash):
        """A [Flatten] Linear [ReLU|Tanh] block without an autograd graph: its update is
        computed in closed form over all micro-batches at once (`_dense_update`)."""
        pre, linear, act = self._dense[offset]
        for layer in pre:
            x, tangents = layer_forward(layer, x, tangents)
        y, tangents = layer_forward(linear, x, tangents)
        if act is not None:
            y, tangents = layer_forward(act, y, tangents)
        stash.dense[offset] = x
        return y, tangents

    def _route(self, tangents: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
        """Add block l's own tangent: a new stream (per-block) or onto the single stream."""
        if tangents is None:
            return new.unsqueeze(0)
        if self.grape.routing == "per_block":
            return torch.cat([tangents, new.unsqueeze(0)])
        return tangents + new.unsqueeze(0)

    def _refresh_noise(self, step: int) -> None:
        if step != self._noise_step:
            self._noise_step, self._noise = step, {}

    def _activation_noise(self, i: int, mb: MicroBatch, shape: tuple[int, ...]) -> torch.Tensor:
        # Every row: drawn for the whole mini-batch from a stream keyed by (seed, step, block),
        # then sliced, so the numbers do not depend on the stage layout or the micro-batching.
        # A few rows per micro-batch (tangent_samples): drawn for those rows only, keyed by the
        # micro-batch's first row as well.
        if self.grape.tangent_samples:
            m = min(mb.size, self.grape.tangent_samples)
            gen = keyed_generator(self.seed, "tangent", mb.step, i, mb.start)
            return torch.randn(m, *shape, generator=gen).to(self.device)
        self._refresh_noise(mb.step)
        if i not in self._noise:
            gen = keyed_generator(self.seed, "tangent", mb.step, i)
            self._noise[i] = torch.randn(mb.total, *shape, generator=gen).to(self.device)
        return self._noise[i][mb.start:mb.start + mb.size]

    def _weight_space_forward(self, block, i, mb, x, tangents, m, stash):
        """Perturb block i's Linear weights (W, b) by one Gaussian draw (P, q) per mini-batch.

        At the Linear's output the tangent is u_s = P x_s + q, with E[u_s u_s^T] =
        (|x_s|^2 + 1) I; so J_hat = sum_s g_s u_s^T / (|x_s|^2 + 1) is unbiased for the summed
        Jacobian of the output w.r.t. the block's pre-activation (what the DFA update uses).
        """
        self._refresh_noise(mb.step)
        seen_linear = False
        for layer in block:
            if isinstance(layer, nn.Linear) and not seen_linear:
                seen_linear = True
                if i not in self._noise:
                    gen = keyed_generator(self.seed, "tangent", mb.step, i)
                    self._noise[i] = (
                        torch.randn(layer.weight.shape, generator=gen).to(self.device),
                        torch.randn(layer.out_features, generator=gen).to(self.device))
                p, q = self._noise[i]
                xm = x[:m].detach()
                u = xm @ p.T + q
                stash.directions[i] = u / (xm.pow(2).sum(1, keepdim=True) + 1)
                x, tangents = layer_forward(layer, x, tangents)
                tangents = self._route(tangents, u)
            else:
                x, tangents = layer_forward(layer, x, tangents)
        return x, tangents

    # -- signal and update -------------------------------------------------------------------

    def backward(self, mb: MicroBatch, signal: OutputSignal, grad_output=None):
        stash = self._stash[mb.index]
        stash.signal = signal
        if self.grape is not None:
            for i, d in stash.directions.items():
                # Stream of block i: its position among the hidden blocks (per-block routing),
                # or the single shared stream.
                k = i if self.grape.routing == "per_block" else 0
                j = fb.jacobian_estimate(signal.tangents[k], d)
                self._jhat[i] = self._jhat[i] + j if i in self._jhat else j
        if self.streaming:
            # Update now and free this micro-batch's activations; GrAPE's B step waits for
            # the end of the mini-batch, so this update uses the previous step's B.
            self._local_backward([self._stash.pop(mb.index)])
        return None

    def output_tangent_shape(self, mb_size: int) -> tuple[int, int] | None:
        """(streams K, tangent samples m) of the output tangents of a micro-batch."""
        if self.grape is None:
            return None
        m = min(mb_size, self.grape.tangent_samples or mb_size)
        return (self.num_blocks - 1 if self.grape.routing == "per_block" else 1), m

    def jacobian_estimates(self) -> dict[int, torch.Tensor]:
        """J_hat_l accumulated over the micro-batches received so far this step."""
        return dict(self._jhat)

    def reset_step(self) -> None:
        super().reset_step()
        self._jhat = {}

    def _projection_source(self, signal: OutputSignal) -> torch.Tensor:
        if self.signal_kind == "target":
            # DRTP: the sign-concordant part of e = softmax - onehot, scaled like e.
            return -signal.target / signal.total
        return signal.error

    def finish_step(self) -> dict[str, float]:
        stats: dict[str, float] = {}
        if self.grape is not None and self._jhat:
            # Replicas sum their estimates first, so every replica takes the same B step.
            self._reduce([self._jhat[i] for i in sorted(self._jhat)])
            for i, b in self.B.items():
                loss, grad = fb.alignment_loss_grad(b.data, self._jhat[i], self.grape.eps)
                b.grad = grad
                stats[f"align_cos/{i}"] = 1.0 - float(loss)
            self.b_optimizer.step()
            with torch.no_grad():
                for b in self.B.values():
                    b.copy_(fb.normalize_columns(b, self.grape.eps))
                    b.grad = None
            self._jhat = {}
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
                if self.is_output(i):
                    delta = stash.signal.error
                else:
                    delta = (src @ self.B[i]).reshape(y.shape)
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

    def state_dict(self) -> dict:
        state = {"B": {i: b.detach().clone() for i, b in self.B.items()}}
        if self.b_optimizer is not None:
            state["b_optimizer"] = self.b_optimizer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for i, b in state["B"].items():
                self.B[i].copy_(b)
        if self.b_optimizer is not None and "b_optimizer" in state:
            self.b_optimizer.load_state_dict(state["b_optimizer"])


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


def _leading_linear(block: nn.Module) -> nn.Linear | None:
    """The block's first layer with parameters, if it is a Linear (weight-space tangents)."""
    for layer in block.children():
        if any(True for _ in layer.parameters()):
            return layer if isinstance(layer, nn.Linear) else None
    return None


def _choose_space(block: Block, space: str) -> str:
    """activation | weight for one block; `auto` picks the smaller space where both apply."""
    lin = _leading_linear(block)
    if space == "weight":
        if lin is None or not isinstance(block, nn.Sequential):
            raise ValueError(
                f"grape.tangent_space=weight needs blocks that start with a Linear layer; block "
                f"'{block.name}' does not (its weight-space tangent would be a biased estimate of "
                "its Jacobian). Use tangent_space: activation or auto."
            )
        return "weight"
    if space == "auto":
        if lin is not None and isinstance(block, nn.Sequential):
            if lin.weight.numel() + lin.out_features < block.out_features:
                return "weight"
        return "activation"
    return "activation"
