"""Forward-mode tangents carried alongside the activations (GrAPE's JVPs).

A tangent bundle is a tensor of shape (K, m, *feat): K tangent streams (one per perturbed block
with per-block routing, one with shared routing) on m rows of the micro-batch, `rows` (a slice
or an index tensor; default: the first m). Pushing it through a layer gives the
Jacobian-vector products J_layer(x[rows]) t for every stream.

Two implementations of the same math:
- a fast path for the layers the models use (Linear, Conv2d, ReLU, Tanh, max/avg pools,
  Flatten, LayerNorm, and the transformer's attention and MLP sub-layers): the tangent is the
  layer's derivative applied to the tangent rows (bias dropped, activation derivatives, pool
  indices, normalisation statistics and attention probabilities taken from the primal), all K
  streams in one call;
- a generic path through `torch.autograd.forward_ad` for any other module (it works where
  `torch.func.jvp` does not, e.g. BatchNorm in train mode; DESIGN section 4).
Tests check the fast path against `torch.func.jvp`.
"""

from __future__ import annotations

import math

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

from ..models.transformer import AttentionSublayer, MLPSublayer


def _fold(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def _unfold(t: torch.Tensor, k: int) -> torch.Tensor:
    return t.reshape(k, t.shape[0] // k, *t.shape[1:])


Rows = slice | torch.Tensor


def layer_forward(layer: nn.Module, x: torch.Tensor, t: torch.Tensor | None,
                  rows: Rows | None = None):
    """Apply `layer` to the primal `x` (recorded by autograd as usual) and push tangents `t`,
    which sit on rows `rows` of `x` (default: the first t.shape[1] rows).

    Returns (y, t_out); `t_out` is None when `t` is None. Tangent arithmetic never enters the
    autograd graph: it uses detached weights and primal-derived masks.
    """
    if t is None:
        return layer(x), None
    k, m = t.shape[0], t.shape[1]
    if rows is None:
        rows = slice(0, m)
    if isinstance(layer, (AttentionSublayer, MLPSublayer)):
        y = layer(x)
        with torch.no_grad():
            xr = x[rows].detach()
            fn = attention_tangent if isinstance(layer, AttentionSublayer) else mlp_tangent
            return y, fn(layer, xr, t)
    if isinstance(layer, nn.LayerNorm) and len(layer.normalized_shape) == 1:
        y = layer(x)
        with torch.no_grad():
            return y, layer_norm_tangent(layer, x[rows].detach(), t)
    if isinstance(layer, nn.Linear) and x.dim() != 2:
        # Tokens: the tangent's linear part on its own (no bias).
        with torch.no_grad():
            t_out = F.linear(t, layer.weight.detach())
        return layer(x), t_out
    if isinstance(layer, nn.Linear) and x.dim() == 2:
        # Tangent rows stacked under the primal rows: one GEMM reads the weights once (a few
        # tangent rows in a GEMM of their own cost almost a whole forward: memory-bound).
        n = x.shape[0]
        with torch.no_grad():
            both = F.linear(torch.cat([x.detach(), _fold(t)]), layer.weight)
        y = _PrecomputedLinear.apply(x, layer.weight, layer.bias, both[:n])
        return y, _unfold(both[n:], k)
    if isinstance(layer, nn.Conv2d) and layer.padding_mode == "zeros":
        n = x.shape[0]
        conf = (layer.stride, layer.padding, layer.dilation, layer.groups)
        with torch.no_grad():
            both = F.conv2d(torch.cat([x.detach(), _fold(t)]), layer.weight, None, *conf)
        y = _PrecomputedConv2d.apply(x, layer.weight, layer.bias, both[:n], conf)
        return y, _unfold(both[n:], k)
    if isinstance(layer, nn.ReLU):
        y = layer(x)
        return y, t * (x[rows].detach() > 0)
    if isinstance(layer, nn.Tanh):
        y = layer(x)
        yd = y[rows].detach()
        return y, t * (1 - yd * yd)
    if isinstance(layer, nn.MaxPool2d) and not layer.return_indices and layer.dilation == 1:
        y, idx = F.max_pool2d(x, layer.kernel_size, layer.stride, layer.padding,
                              layer.dilation, layer.ceil_mode, return_indices=True)
        # The max pool's derivative selects the arg-max input of each window: gather the tangent
        # at the primal's indices (flattened per channel).
        idx = idx[rows]
        idx = idx.unsqueeze(0).expand(k, *idx.shape)
        tt = t.flatten(3).gather(3, idx.flatten(3)).reshape(idx.shape)
        return y, tt
    if isinstance(layer, nn.AvgPool2d):
        return layer(x), _unfold(layer(_fold(t)), k)
    if isinstance(layer, nn.Flatten):
        # Flatten's dims refer to the primal; the bundle has one extra leading dim.
        return layer(x), t.flatten(layer.start_dim + 1, layer.end_dim if layer.end_dim < 0
                                   else layer.end_dim + 1)
    if isinstance(layer, nn.Identity):
        return x, t
    return generic_layer_forward(layer, x, t, rows)


class _PrecomputedLinear(torch.autograd.Function):
    """`x W^T + b` whose product was computed by a fused call; records the usual backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, product):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return product + bias if bias is not None else product.clone()

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        grad_w = grad.T @ x if ctx.needs_input_grad[1] else None
        grad_b = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


class _PrecomputedConv2d(torch.autograd.Function):
    """conv2d(x, W) + b whose convolution was computed by a fused call."""

    @staticmethod
    def forward(ctx, x, weight, bias, product, conf):
        ctx.save_for_backward(x, weight)
        ctx.conf = conf
        ctx.has_bias = bias is not None
        return product + bias.view(1, -1, 1, 1) if bias is not None else product.clone()

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conf
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(x.shape, weight, grad, stride, padding,
                                                dilation, groups)
        if ctx.needs_input_grad[1]:
            grad_w = torch.nn.grad.conv2d_weight(x, weight.shape, grad, stride, padding,
                                                 dilation, groups)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad.sum((0, 2, 3))
        return grad_x, grad_w, grad_b, None, None


# -- closed-form tangents of the transformer's layers -------------------------------------------
# Each takes the primal rows `x` (m, T, d), detached, and the bundle `t` (K, m, T, d); weights are
# read detached. torch.func.jvp of the same modules is the reference in the tests.


def layer_norm_tangent(ln: nn.LayerNorm, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """d LN(x)[t]: with x_hat = (x - mu) / sigma and t_c = t - mean(t),
    d x_hat = (t_c - x_hat mean(x_hat t_c)) / sigma; the affine scale multiplies it."""
    mu = x.mean(-1, keepdim=True)
    rstd = (x.var(-1, unbiased=False, keepdim=True) + ln.eps).rsqrt()
    xhat = (x - mu) * rstd
    tc = t - t.mean(-1, keepdim=True)
    out = rstd * (tc - xhat * (xhat * tc).mean(-1, keepdim=True))
    return out * ln.weight.detach() if ln.weight is not None else out


def attention_tangent(layer: AttentionSublayer, x: torch.Tensor,
                      t: torch.Tensor) -> torch.Tensor:
    """Tangent of x + proj(attn(LN(x))). With S = q k^T / sqrt(d_h) (causal), A = softmax(S),
    o = A v: dS = (dq k^T + q dk^T) / sqrt(d_h), dA = A * (dS - rowsum(A * dS)),
    do = dA v + A dv. The attention probabilities of the tangent rows are recomputed here."""
    w_qkv = layer.qkv.weight.detach()
    q, k, v = layer.split_heads(F.linear(layer.ln(x), w_qkv, layer.qkv.bias.detach()))
    dq, dk, dv = layer.split_heads(F.linear(layer_norm_tangent(layer.ln, x, t), w_qkv))
    scale = q.shape[-1] ** -0.5
    n = q.shape[-2]
    causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
    a = torch.softmax((q @ k.transpose(-1, -2) * scale).masked_fill(~causal, float("-inf")), -1)
    ds = (dq @ k.transpose(-1, -2) + q @ dk.transpose(-1, -2)) * scale  # (K, m, H, T, T)
    da = a * (ds - (a * ds).sum(-1, keepdim=True))
    do = da @ v + a @ dv
    return t + F.linear(layer.merge_heads(do), layer.proj.weight.detach())


def mlp_tangent(layer: MLPSublayer, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Tangent of x + W2 GELU(W1 LN(x) + b1) + b2; GELU'(a) = Phi(a) + a phi(a)."""
    a = layer.fc1(layer.ln(x))
    da = F.linear(layer_norm_tangent(layer.ln, x, t), layer.fc1.weight.detach())
    gelu_d = 0.5 * (1 + torch.erf(a * 0.5**0.5)) \
        + a * torch.exp(-0.5 * a * a) * (2 * math.pi) ** -0.5
    return t + F.linear(da * gelu_d, layer.fc2.weight.detach())


def generic_layer_forward(layer: nn.Module, x: torch.Tensor, t: torch.Tensor,
                          rows: Rows | None = None):
    """Reference path: forward-mode AD through any module, one stream at a time."""
    y = layer(x)
    if rows is None:
        rows = slice(0, t.shape[1])
    outs = []
    with torch.no_grad(), fwAD.dual_level():
        for stream in t:
            dual = fwAD.make_dual(x[rows].detach(), stream)
            outs.append(fwAD.unpack_dual(layer(dual)).tangent)
    return y, torch.stack(outs)


def block_forward(block: nn.Module, x: torch.Tensor, t: torch.Tensor | None,
                  rows: Rows | None = None):
    """Forward through a block's layers, carrying the tangent bundle (on rows `rows`)."""
    if t is None:
        return block(x), None
    if isinstance(block, nn.Sequential):
        for layer in block:
            x, t = layer_forward(layer, x, t, rows)
        return x, t
    return generic_layer_forward(block, x, t, rows)

