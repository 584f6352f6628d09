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

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn

from ..models.dropout import KeyedDropout
from ..models.resnet import BasicBlock
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
    if isinstance(layer, BasicBlock):
        return basic_block_forward(layer, x, t, rows)
    if isinstance(layer, nn.BatchNorm2d):
        y = layer(x)
        with torch.no_grad():
            return y, batch_norm_tangent(layer, x, t)
    if isinstance(layer, nn.AdaptiveAvgPool2d):
        with torch.no_grad():
            t_out = _unfold(layer(_fold(t)), k)
        return layer(x), t_out
    if isinstance(layer, AttentionSublayer):
        return attention_forward(layer, x, t, rows)
    if isinstance(layer, MLPSublayer):
        return mlp_forward(layer, x, t, rows)
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
    if isinstance(layer, KeyedDropout):
        # Linear in x: one mask, drawn once, scales the primal and the tangent rows alike.
        mask = layer.mask(x)
        if mask is None:
            return x, t
        return x * mask, t * mask[rows]
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


# -- closed-form tangents of the ResNets' layers ------------------------------------------------


def batch_norm_tangent(bn: nn.BatchNorm2d, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """BatchNorm's tangent with the batch statistics held fixed: t * gamma / sqrt(var + eps)
    per channel, var being the statistic the primal normalised `x` (the whole micro-batch)
    with: the batch's in train mode, the running one in eval mode. J_hat then estimates each
    sample's Jacobian at the batch's statistics, not the batch-coupled one (docs/resnet.md)."""
    if bn.training or bn.running_var is None:
        var = x.detach().var(dim=(0, 2, 3), unbiased=False)
    else:
        var = bn.running_var
    scale = (var + bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.detach()
    return t * scale.view(1, 1, -1, 1, 1)


def basic_block_forward(block: BasicBlock, x: torch.Tensor, t: torch.Tensor,
                        rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
    """ReLU(BN(conv(ReLU(BN(conv(x))))) + shortcut(x)) and its tangent: the convolutions and
    the shortcut are linear, BatchNorm as `batch_norm_tangent`, the ReLUs' masks from the
    primal."""
    a1 = block.conv1(x)
    h = F.relu(block.bn1(a1))
    a2 = block.conv2(h)
    z = block.bn2(a2) + block.shortcut(x)
    y = F.relu(z)
    k = t.shape[0]
    with torch.no_grad():
        c1 = block.conv1
        u = _unfold(F.conv2d(_fold(t), c1.weight.detach(), None, c1.stride, c1.padding), k)
        u = batch_norm_tangent(block.bn1, a1, u) * (h[rows].detach() > 0)
        c2 = block.conv2
        u = _unfold(F.conv2d(_fold(u), c2.weight.detach(), None, c2.stride, c2.padding), k)
        u = batch_norm_tangent(block.bn2, a2, u) + block.shortcut(t)
        return y, u * (z[rows].detach() > 0)


# -- closed-form tangents of the transformer's layers -------------------------------------------
# Each runs the sub-layer's primal (recorded by autograd, the same ops as its `forward`) and
# pushes the bundle `t` (K, m, T, d) on rows `rows`, reusing the primal's intermediates (LN
# output, projections, pre-activations) and torch's fused derivative kernels where a
# derivative has one. Weights are read detached. torch.func.jvp is the reference in the tests.


def _fold_k(x: torch.Tensor, k: int) -> torch.Tensor:
    """The primal rows repeated for K tangent streams (a copy only when K > 1)."""
    return x if k == 1 else x.expand(k, *x.shape).reshape(-1, *x.shape[1:])


def layer_norm_tangent(ln: nn.LayerNorm, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """d LN(x)[t] for the rows `x` (m, ..., d) and the bundle `t` (K, m, ..., d).

    LN's Jacobian without its affine part, (I - 11^T/n - x_hat x_hat^T/n) / sigma, is
    symmetric, so its JVP is its VJP: torch's fused layer-norm backward, applied to the
    tangent; the affine scale multiplies the result."""
    k = t.shape[0]
    xk = _fold_k(x, k)
    shape = (x.shape[-1],)
    _, mean, rstd = torch.native_layer_norm(xk, shape, None, None, ln.eps)
    out = torch.ops.aten.native_layer_norm_backward(
        _fold(t), xk, shape, mean, rstd, None, None, [True, False, False])[0]
    out = _unfold(out, k)
    return out * ln.weight.detach() if ln.weight is not None else out


_CAUSAL: dict[tuple[int, torch.device], torch.Tensor] = {}


def _causal_mask(n: int, device: torch.device) -> torch.Tensor:
    """True above the diagonal (the positions a token may not attend to); made once."""
    key = (n, device)
    if key not in _CAUSAL:
        _CAUSAL[key] = torch.ones(n, n, dtype=torch.bool, device=device).triu(1)
    return _CAUSAL[key]


def attention_forward(layer: AttentionSublayer, x: torch.Tensor, t: torch.Tensor,
                      rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
    """x + proj(attn(LN(x))) and its tangent (`attention_tangent` from the tangent of qkv's
    output)."""
    z = layer.qkv(layer.ln(x))
    q, k, v = layer.split_heads(z)
    o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    y = x + layer.proj(layer.merge_heads(o))
    with torch.no_grad():
        dz = F.linear(layer_norm_tangent(layer.ln, x[rows].detach(), t),
                      layer.qkv.weight.detach())
        do = attention_tangent(layer, z[rows].detach(), dz)
        return y, t + F.linear(do, layer.proj.weight.detach())


@torch.no_grad()
def attention_tangent(layer: AttentionSublayer, z: torch.Tensor, dz: torch.Tensor
                      ) -> torch.Tensor:
    """The tangent of the merged attention output for qkv outputs `z` (m, T, 3d) of the
    tangent rows and their tangent bundle `dz` (K, m, T, 3d). With S = q k^T / sqrt(d_h)
    (causal), A = softmax(S), o = A v: dS = (dq k^T + q dk^T) / sqrt(d_h),
    dA = A * (dS - rowsum(A * dS)) (softmax's backward, a symmetric Jacobian), do = dA v + A dv.
    The primal uses the fused attention kernel, which does not expose A: A is computed for the
    tangent rows only."""
    n_streams = dz.shape[0]
    q, k, v = layer.split_heads(z)
    dq, dk, dv = layer.split_heads(dz)
    scale = q.shape[-1] ** -0.5
    kt = k.transpose(-1, -2)
    a = torch.softmax((q @ kt).mul_(scale).masked_fill_(
        _causal_mask(q.shape[-2], z.device), float("-inf")), -1)
    ds = dq @ kt
    ds += q @ dk.transpose(-1, -2)
    ds *= scale  # (K, m, H, T, T)
    if n_streams == 1:
        da = torch._softmax_backward_data(ds[0], a, -1, a.dtype).unsqueeze(0)
    else:
        da = a * (ds - (a * ds).sum(-1, keepdim=True))
    do = da @ v
    do += a @ dv
    return layer.merge_heads(do)


def mlp_forward(layer: MLPSublayer, x: torch.Tensor, t: torch.Tensor,
                rows: Rows) -> tuple[torch.Tensor, torch.Tensor]:
    """x + W2 GELU(W1 LN(x) + b1) + b2 and its tangent; GELU'(a) = Phi(a) + a phi(a), applied
    by torch's fused GELU backward (a diagonal Jacobian)."""
    a = layer.fc1(layer.ln(x))
    y = x + layer.fc2(F.gelu(a))
    with torch.no_grad():
        n_streams = t.shape[0]
        ar = a[rows].detach()
        da = F.linear(layer_norm_tangent(layer.ln, x[rows].detach(), t),
                      layer.fc1.weight.detach())
        dg = _unfold(torch.ops.aten.gelu_backward(_fold(da), _fold_k(ar, n_streams)), n_streams)
        return y, t + F.linear(dg, layer.fc2.weight.detach())


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

