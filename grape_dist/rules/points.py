"""Feedback at every weight layer (`feedback.points: layer`): forward, tangents and local
update of the blocks whose layers expose taps (residual blocks, attention and MLP sub-layers).

In the paper's form a block has one feedback point, its output, and its update backpropagates
the projected signal through the whole block: both convs of a residual block, attention and MLP
of a transformer layer. That is nearly all of BP's backward. Here each weight layer W has a
point of its own, the first place after W where the signal can be taken with no other weight in
between, and W is trained from that point's signal alone, backpropagated only through the
element-wise or parameter-free operations between W and its point (ReLU, BatchNorm, GELU, the
residual sum). No layer's input gradient is formed and no signal passes back through a weight:

- residual block `y = ReLU(BN2(conv2 h) + s(x))`, `h = ReLU(BN1(conv1 x))`: points `h` (conv1,
  BN1) and `y` (conv2, BN2). Autograd on local graphs whose conv inputs are detached, so it
  computes exactly the weight gradients (and BatchNorm's affine ones).
- attention `y = x + proj(o)`, `o = attn(z)`, `z = qkv(LN x)`: points `z` and `y`. Both are
  linear in their weight layer's output, so with `delta = s B` the weight gradient factors:
  `dW = delta^T u = B^T (s^T u)` for the layer's input `u`, and `s^T u` is d_signal x d_in per
  token instead of d_out x d_in plus the projection itself.
- MLP `y = x + fc2(g)`, `g = GELU(fc1(LN x))`: points `g` (fc1: `delta_a = (s B) * GELU'(a)`)
  and `y` (fc2, factored as above).
- The LayerNorm in front of qkv and fc1 is a per-feature affine `gamma * x_hat + beta` directly
  before the weight layer W. Its exact gradients from W's signal follow from W's own without
  any input gradient: with `G = delta_a^T x_hat` and `db = sum delta_a`,
  `dW = G diag(gamma) + db beta^T`, `dgamma = colsum(W * G)`, `dbeta = db^T W`.

Every point keeps the rule's meaning: a DFA point receives `s B_p`, a GrAPE point draws its own
tangent at the point, so `J_hat_p` estimates the Jacobian of the signal's output with respect to
that point (docs/points.md).

Tangents follow the primal: BatchNorm at the batch's statistics, ReLU/GELU derivatives and the
attention probabilities from the primal's intermediates, as in `tangents.py`. At each point the
rule's `inject(j, u)` adds point j's tangent to the bundle `u` arriving there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..models import Block
from ..models.resnet import BasicBlock
from ..models.transformer import AttentionSublayer, MLPSublayer
from .base import accumulate_grad
from .feedback import project
from .tangents import (
    Rows,
    _fold,
    _fold_k,
    _unfold,
    attention_tangent,
    layer_norm_tangent,
)

# (tap number within the block, tangent bundle at the tap or None) -> the bundle carrying the
# tap's own tangent as well.
Inject = Callable[[int, torch.Tensor | None], torch.Tensor | None]


class LocalUpdate:
    """What one micro-batch leaves at one layer until its signal arrives."""

    taps = 2

    def grads(self, src: torch.Tensor, feedback: list[torch.Tensor]
              ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Accumulate the layer's weight gradients for the projection source `src` (rows x
        d_signal) through the points' feedback matrices; returns (output, gradient) pairs that
        the caller passes to one `torch.autograd.backward` with the other blocks'."""
        raise NotImplementedError


def tapped_forward(block: Block, x: torch.Tensor, t: torch.Tensor | None, rows: Rows | None,
                   inject: Inject) -> tuple[torch.Tensor, torch.Tensor | None, list[LocalUpdate]]:
    """Run `block` (all of whose layers have taps) on `x`, carrying the tangent bundle `t` on
    rows `rows` and adding each point's tangent with `inject`; returns (output, tangents, one
    LocalUpdate per layer)."""
    updates, base = [], 0
    for layer in block:
        forward = _FORWARDS.get(type(layer))
        if forward is None:
            raise TypeError(f"{type(layer).__name__} has no layer-point forward")

        def at(j: int, u: torch.Tensor | None, base: int = base) -> torch.Tensor | None:
            return inject(base + j, u)
        x, t, update = forward(layer, x, t, slice(0, t.shape[1]) if rows is None and
                               t is not None else rows, at)
        updates.append(update)
        base += update.taps
    return x, t, updates


def tap_outputs(block: Block, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The block's output and its points' values, recorded by autograd through the whole block
    (the alignment probe's exact gradients at the points)."""
    taps = []
    for layer in block:
        if isinstance(layer, BasicBlock):
            h = F.relu(layer.bn1(layer.conv1(x)))
            y = F.relu(layer.bn2(layer.conv2(h)) + layer.shortcut(x))
            taps += [h, y]
        elif isinstance(layer, AttentionSublayer):
            z = layer.qkv(layer.ln(x))
            o = F.scaled_dot_product_attention(*layer.split_heads(z), is_causal=True)
            y = x + layer.proj(layer.merge_heads(o))
            taps += [z, y]
        elif isinstance(layer, MLPSublayer):
            g = F.gelu(layer.fc1(layer.ln(x)))
            y = x + layer.fc2(g)
            taps += [g, y]
        else:
            raise TypeError(f"{type(layer).__name__} has no layer points")
        x = y
    return x, taps


# -- residual block ---------------------------------------------------------------------------


class _LocalGraphs(LocalUpdate):
    """Points whose values carry local autograd graphs ending at detached weight-layer inputs."""

    def __init__(self, taps: list[torch.Tensor]) -> None:
        self.values = taps

    def grads(self, src, feedback):
        return [(h, project(src, b, h.shape)) for h, b in zip(self.values, feedback)]


def _plus(u: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
    """u + t for a bundle `u` that may hold more streams than `t` (per-point routing: the
    streams of points inside this layer come last and have no path through `t`)."""
    if t is None:
        return u
    if len(u) == len(t):
        return u + t
    u = u.clone()
    u[:len(t)] += t
    return u


def _conv_tangent(conv: nn.Conv2d, u: torch.Tensor) -> torch.Tensor:
    k = u.shape[0]
    return _unfold(F.conv2d(_fold(u), conv.weight.detach(), None, conv.stride, conv.padding,
                            conv.dilation, conv.groups), k)


def _batch_norm(bn: nn.BatchNorm2d, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchNorm2d's forward, running statistics updated as its own forward does, and the
    per-channel scale gamma / sqrt(var + eps) it applied: the tangent's BatchNorm factor with
    the statistics held (`tangents.batch_norm_tangent`), taken from the primal instead of a
    second pass over the activations for the variance."""
    if not bn.training or not bn.track_running_stats:
        if bn.training:
            return bn(a), _bn_scale(bn, a.detach().var(dim=(0, 2, 3), unbiased=False))
        return bn(a), _bn_scale(bn, bn.running_var)
    momentum = bn.momentum
    bn.num_batches_tracked.add_(1)
    if momentum is None:  # a cumulative average, as nn.BatchNorm2d takes it
        momentum = 1.0 / float(bn.num_batches_tracked)
    out, _, rstd = torch.native_batch_norm(a, bn.weight, bn.bias, bn.running_mean,
                                           bn.running_var, True, momentum, bn.eps)
    scale = rstd.detach()
    return out, scale * bn.weight.detach() if bn.weight is not None else scale


def _bn_scale(bn: nn.BatchNorm2d, var: torch.Tensor) -> torch.Tensor:
    scale = (var + bn.eps).rsqrt()
    return scale * bn.weight.detach() if bn.weight is not None else scale


def _basic_block(block: BasicBlock, x: torch.Tensor, t: torch.Tensor | None, rows: Rows,
                 inject: Inject):
    x = x.detach()
    with torch.enable_grad():
        b1, s1 = _batch_norm(block.bn1, block.conv1(x))
        h = F.relu(b1)
        # conv2 learns from y's point only.
        b2, s2 = _batch_norm(block.bn2, block.conv2(h.detach()))
        z = b2 + block.shortcut(x)
        y = F.relu(z)
    with torch.no_grad():
        u = None
        if t is not None:
            u = _conv_tangent(block.conv1, t) * s1.view(1, 1, -1, 1, 1) * (h[rows] > 0)
        u = inject(0, u)
        if u is not None:
            u = _conv_tangent(block.conv2, u) * s2.view(1, 1, -1, 1, 1)
            u = _plus(u, block.shortcut(t)) * (z[rows] > 0)
        u = inject(1, u)
    return y, u, _LocalGraphs([h, y])


# -- transformer sub-layers -------------------------------------------------------------------


def _normalize(ln: nn.LayerNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_hat, LN(x)): the normalised input before and after LayerNorm's affine."""
    x_hat = F.layer_norm(x, ln.normalized_shape, None, None, ln.eps)
    if ln.weight is None:
        return x_hat, x_hat
    if ln.bias is None:
        return x_hat, x_hat * ln.weight
    return x_hat, torch.addcmul(ln.bias, x_hat, ln.weight)


def _add_linear_grads(linear: nn.Linear, dw: torch.Tensor, db: torch.Tensor) -> None:
    accumulate_grad(linear.weight, dw)
    if linear.bias is not None:
        accumulate_grad(linear.bias, db)


def _add_normed_linear_grads(ln: nn.LayerNorm, linear: nn.Linear, g: torch.Tensor,
                             db: torch.Tensor) -> None:
    """Gradients of `linear(LN(x))`'s weights and LN's affine from G = delta_a^T x_hat and
    db = sum delta_a (module docstring): no input gradient of the linear layer."""
    if ln.weight is None:
        _add_linear_grads(linear, g, db)
        return
    w = linear.weight.detach()
    dw = g * ln.weight.detach()
    if ln.bias is not None:
        dw.addr_(db, ln.bias.detach())
        accumulate_grad(ln.bias, db @ w)
    accumulate_grad(ln.weight, (w * g).sum(0))
    _add_linear_grads(linear, dw, db)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class _AttentionUpdate(LocalUpdate):
    def __init__(self, layer: AttentionSublayer, x_hat: torch.Tensor, o: torch.Tensor) -> None:
        self.layer, self.x_hat, self.o = layer, x_hat, o

    @torch.no_grad()
    def grads(self, src, feedback):
        b_z, b_y = feedback
        total = src.sum(0)
        # qkv from z's point: delta_z = src B_z, G = B_z^T (src^T x_hat).
        _add_normed_linear_grads(self.layer.ln, self.layer.qkv,
                                 b_z.T @ (src.T @ _rows(self.x_hat)), b_z.T @ total)
        # proj from y's point: y is x + proj(o), so delta at proj's output is src B_y.
        _add_linear_grads(self.layer.proj, b_y.T @ (src.T @ _rows(self.o)), b_y.T @ total)
        return []


@torch.no_grad()
def _attention(layer: AttentionSublayer, x: torch.Tensor, t: torch.Tensor | None, rows: Rows,
               inject: Inject):
    x_hat, u = _normalize(layer.ln, x)
    z = F.linear(u, layer.qkv.weight, layer.qkv.bias)
    o = layer.merge_heads(F.scaled_dot_product_attention(*layer.split_heads(z), is_causal=True))
    y = x + F.linear(o, layer.proj.weight, layer.proj.bias)
    dz = None
    if t is not None:
        dz = F.linear(layer_norm_tangent(layer.ln, x[rows], t), layer.qkv.weight)
    dz = inject(0, dz)
    dy = t
    if dz is not None:
        dy = _plus(F.linear(attention_tangent(layer, z[rows], dz), layer.proj.weight), t)
    return y, inject(1, dy), _AttentionUpdate(layer, x_hat, o)


class _MLPUpdate(LocalUpdate):
    def __init__(self, layer: MLPSublayer, x_hat: torch.Tensor, a: torch.Tensor,
                 g: torch.Tensor) -> None:
        self.layer, self.x_hat, self.a, self.g = layer, x_hat, a, g

    @torch.no_grad()
    def grads(self, src, feedback):
        b_g, b_y = feedback
        # fc1 from g's point: delta_a = (src B_g) * GELU'(a).
        da = torch.ops.aten.gelu_backward(src @ b_g, _rows(self.a))
        _add_normed_linear_grads(self.layer.ln, self.layer.fc1, da.T @ _rows(self.x_hat),
                                 da.sum(0))
        # fc2 from y's point (y = x + fc2(g)): G = B_y^T (src^T g).
        _add_linear_grads(self.layer.fc2, b_y.T @ (src.T @ _rows(self.g)), b_y.T @ src.sum(0))
        return []


@torch.no_grad()
def _mlp(layer: MLPSublayer, x: torch.Tensor, t: torch.Tensor | None, rows: Rows,
         inject: Inject):
    x_hat, u = _normalize(layer.ln, x)
    a = F.linear(u, layer.fc1.weight, layer.fc1.bias)
    g = F.gelu(a)
    y = x + F.linear(g, layer.fc2.weight, layer.fc2.bias)
    dg = None
    if t is not None:
        k = t.shape[0]
        da = F.linear(layer_norm_tangent(layer.ln, x[rows], t), layer.fc1.weight)
        dg = _unfold(torch.ops.aten.gelu_backward(_fold(da), _fold_k(a[rows], k)), k)
    dg = inject(0, dg)
    dy = t
    if dg is not None:
        dy = _plus(F.linear(dg, layer.fc2.weight), t)
    return y, inject(1, dy), _MLPUpdate(layer, x_hat, a, g)


_FORWARDS = {BasicBlock: _basic_block, AttentionSublayer: _attention, MLPSublayer: _mlp}
