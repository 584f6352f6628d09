"""Feedback at every weight layer (`feedback.points: layer`) against independent computations:
the points' tangents against torch.func.jvp of the layer with perturbations added at its
points, J_hat's mean against the true Jacobian at each point, and the DFA update of every weight
against autograd of the point's value with respect to that layer's own parameters only."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import freeze_batch_statistics, one_step, sgd_config
from torch.func import jacrev, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from grape_dist.models import build_resnet, build_transformer
from grape_dist.models.resnet import BasicBlock
from grape_dist.models.transformer import AttentionSublayer
from grape_dist.rules import MicroBatch, build_stage_rule, output_signal
from grape_dist.rules.points import tapped_forward

VOCAB, CONTEXT, D = 11, 6, 8


# Every test in float64 (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("float64")


def resnet():
    return build_resnet((3, 8, 8), 5, 8).materialize(seed=0)


def transformer(feedback="macro"):
    """Two layers, LayerNorm affine parameters away from their (1, 0) initial values so that
    every term of their gradients counts."""
    m = build_transformer(VOCAB, CONTEXT, D, 2, 2, feedback).materialize(seed=0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for ln in (mod for mod in m.modules() if isinstance(mod, torch.nn.LayerNorm)):
            ln.weight.copy_(1 + 0.3 * torch.randn(ln.weight.shape, generator=g))
            ln.bias.copy_(0.3 * torch.randn(ln.bias.shape, generator=g))
    return m


def tokens(n, seed=0):
    return torch.randint(0, VOCAB, (n, CONTEXT), generator=torch.Generator().manual_seed(seed))


def perturbed(layer, x, e0, e1):
    """The layer written out with additive perturbations at its two points (the reference)."""
    if isinstance(layer, BasicBlock):
        h = F.relu(layer.bn1(layer.conv1(x))) + e0
        return F.relu(layer.bn2(layer.conv2(h)) + layer.shortcut(x)) + e1
    if isinstance(layer, AttentionSublayer):
        z = layer.qkv(layer.ln(x)) + e0
        o = F.scaled_dot_product_attention(*layer.split_heads(z), is_causal=True)
        return x + layer.proj(layer.merge_heads(o)) + e1
    g = F.gelu(layer.fc1(layer.ln(x))) + e0
    return x + layer.fc2(g) + e1


def test_points_of_the_residual_and_transformer_blocks():
    pts = resnet().feedback_points(layer=True)
    assert [p.name for p in pts] == ["stem", "res1.0.conv1", "res1.0.conv2", "res2.0.conv1",
                                     "res2.0.conv2", "res3.0.conv1", "res3.0.conv2"]
    assert [p.index for p in pts] == list(range(7))
    assert pts[3].shape == (32, 4, 4) and pts[3].tap == 0 and pts[0].tap is None
    m = transformer()
    names = [(p.name, p.shape) for p in m.feedback_points(layer=True)]
    assert names[:5] == [("embed", (CONTEXT, D)), ("layer0.qkv", (CONTEXT, 3 * D)),
                         ("layer0.proj", (CONTEXT, D)), ("layer0.fc1", (CONTEXT, 4 * D)),
                         ("layer0.fc2", (CONTEXT, D))]
    assert [m.feedback_width(p) for p in m.feedback_points(layer=True)][:4] == [D, 3 * D, D, 4 * D]
    # The paper's form: one point per hidden block, numbered like the blocks.
    assert [(p.index, p.block) for p in m.feedback_points()] == [(0, 0), (1, 1), (2, 2)]


def _layers():
    """(name, layer, input) for each layer type with points, in float64."""
    m = resnet()
    x = torch.randn(6, 16, 8, 8)
    t = transformer()
    h = t.blocks[0](tokens(5))
    return [("residual", m.blocks[1][0], x), ("residual-stride", m.blocks[2][0], x),
            ("attention", t.blocks[1][0], h), ("mlp", t.blocks[1][1], h)]


@pytest.mark.parametrize("routing", ["shared", "per_point"])
@pytest.mark.parametrize("case", range(4), ids=["residual", "residual-stride", "attention",
                                                  "mlp"])
def test_point_tangents_match_torch_func_jvp(case, routing):
    """K incoming streams on chosen rows plus a tangent injected at each of the layer's two
    points: every output stream equals torch.func.jvp of the layer with the perturbations at its
    points (BatchNorm at the batch's statistics, held), and the primal is the layer's own."""
    _, layer, x = _layers()[case]
    torch.manual_seed(1)
    rows = torch.tensor([0, 3, 4])
    k = 2
    t = torch.randn(k, len(rows), *x.shape[1:])
    shapes = [None, None]
    draws = []

    def inject(j, u):
        p = torch.randn(1, len(rows), *shapes[j])
        draws.append(p[0])
        if u is None:
            return p
        return torch.cat([u, p]) if routing == "per_point" else u + p

    ref = copy.deepcopy(layer)
    if isinstance(layer, BasicBlock):
        freeze_batch_statistics(ref, x)
        shapes[0] = shapes[1] = ref(x).shape[1:]
    else:
        shapes[0] = (CONTEXT, 3 * D if isinstance(layer, AttentionSublayer) else 4 * D)
        shapes[1] = (CONTEXT, D)
    block = torch.nn.Sequential(layer)
    y, out, _ = tapped_forward(block, x, t, rows, inject)
    torch.testing.assert_close(y, ref(x))
    zero = [torch.zeros(len(rows), *s) for s in shapes]

    def f(xr, e0, e1):
        with sdpa_kernel([SDPBackend.MATH]):  # the fused kernels have no forward AD
            return perturbed(ref, xr, e0, e1)

    def tangent(tx, t0, t1):
        return jvp(f, (x[rows], *zero), (tx, t0, t1))[1]

    tx0 = torch.zeros_like(t[0])
    if routing == "shared":
        assert out.shape[0] == k
        for s in range(k):
            torch.testing.assert_close(out[s], tangent(t[s], draws[0], draws[1]))
    else:
        assert out.shape[0] == k + 2
        for s in range(k):
            torch.testing.assert_close(out[s], tangent(t[s], *zero))
        torch.testing.assert_close(out[k], tangent(tx0, draws[0], zero[1]))
        torch.testing.assert_close(out[k + 1], tangent(tx0, zero[0], draws[1]))


def _with_points(model, x, eps):
    """Logits (or for a language model the head's input) with perturbations `eps` (point index
    -> tensor) added at the model's layer points; BatchNorm must be frozen by the caller."""
    pts = model.feedback_points(layer=True)
    blocks = list(model.blocks)
    last = len(blocks) - 1 if model.signal_spec.at_head_input else len(blocks)
    for i, block in enumerate(blocks[:last]):
        here = [p for p in pts if p.block == i]
        if here and here[0].tap is not None:
            j = 0
            for layer in block:
                x = perturbed(layer, x, eps[here[j].index], eps[here[j + 1].index])
                j += 2
        else:
            x = block(x)
            if here:
                x = x + eps[here[0].index]
    return x


def _diagonal_jacobians(model, x, point_ids):
    """sum over samples (and positions) of d out_s / d point_s, as (d_out x n) matrices."""
    pts = model.feedback_points(layer=True)
    zeros = {p.index: torch.zeros(len(x), *p.shape) for p in pts}
    out = {}
    for i in point_ids:
        def f(e, i=i):
            with sdpa_kernel([SDPBackend.MATH]):
                return _with_points(model, x, {**zeros, i: e})
        jac = jacrev(f)(zeros[i]).detach()  # (N, [T,] d_out, N, *shape)
        n = len(x)
        if model.signal_spec.positions == 1:
            out[i] = sum(jac[s, :, s].reshape(jac.shape[1], -1) for s in range(n))
        else:
            out[i] = sum(jac[s, t, :, s, t] for s in range(n) for t in range(CONTEXT))
    return out


def _mean_estimates(cfg, model, x, y, copies, steps):
    """The mean of J_hat over `copies` x `steps` tangent draws at fixed weights, through the
    rule. Each step runs `copies` copies of the batch: every row draws its own tangent, and
    BatchNorm's statistics over the copies are the batch's own, so a step sums `copies`
    independent draws of the batch's estimate."""
    rule = build_stage_rule(cfg, copy.deepcopy(model), 0, len(model.blocks))
    xs, ys = x.repeat(copies, *[1] * (x.dim() - 1)), y.repeat(copies, *[1] * (y.dim() - 1))
    n = len(ys)
    total = {}
    for step in range(steps):
        mb = MicroBatch(step, 0, 0, n, n)
        h, t = rule.forward(mb, xs, None)
        _, _, signal = output_signal(h, ys, n, t)
        rule.backward(mb, rule.signal_at_output(mb, signal), None)
        for i, j in rule.learner.jacobian_estimates().items():
            total[i] = total.get(i, 0) + j / (copies * steps)
        rule.reset_step()
    return total


def test_resnet_layer_point_estimates_are_unbiased():
    """GrAPE through the rule (a stream per point, channel-shared B at the conv points; shared
    routing adds zero-mean cross terms, checked through the tangents above): the mean of
    J_hat over tangent draws at fixed weights is J P at every point, J the exact Jacobian of the
    logits at that point with BatchNorm's batch statistics held."""
    model = resnet()
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([1, 3])
    cfg = sgd_config("grape", "feedback.points=layer", "grape.routing=per_block",
                     "feedback.conv=channel")
    est = _mean_estimates(cfg, model, x, y, 1000, 6)
    assert sorted(est) == list(range(7))
    frozen = copy.deepcopy(model)
    h = x
    for block in frozen.blocks:
        freeze_batch_statistics(block, h)
        h = block(h)
    exact = _diagonal_jacobians(frozen, x, sorted(est))
    for i, j in exact.items():
        c = model.feedback_points(layer=True)[i].shape[0]
        jp = j.reshape(j.shape[0], c, -1).sum(-1)
        err = float((est[i] - jp).norm() / jp.norm())
        assert err < 0.1, (i, err)


def test_transformer_layer_point_estimates_are_unbiased():
    """Per-point routing, B shared over positions: E[J_hat] at each point (qkv, attention
    output, MLP hidden, MLP output) is the sum over samples and positions of the (t, t) block
    of d(head input)/d(point)."""
    model = transformer()
    x, y = tokens(2), tokens(2, seed=1)
    cfg = sgd_config("grape", "feedback.points=layer", "data.name=shakespeare",
                     "model.name=transformer")
    est = _mean_estimates(cfg, model, x, y, 1000, 4)
    assert sorted(est) == list(range(9))
    exact = _diagonal_jacobians(model, x, sorted(est))
    for i, j in exact.items():
        err = float((est[i] - j).norm() / j.norm())
        assert err < 0.1, (i, err)


def _layer_update(layer, x, deltas):
    """-(the DFA update) of each of the layer's parameters: autograd of <delta_j, point_j> with
    respect to the parameters of point j's own weight layer only, every input held."""
    x = x.detach()
    grads = {}
    with sdpa_kernel([SDPBackend.MATH]):
        if isinstance(layer, BasicBlock):
            h = F.relu(layer.bn1(layer.conv1(x)))
            y = F.relu(layer.bn2(layer.conv2(h.detach())) + layer.shortcut(x))
            own = [[layer.conv1, layer.bn1], [layer.conv2, layer.bn2]]
            values = [h, y]
        elif isinstance(layer, AttentionSublayer):
            z = layer.qkv(layer.ln(x))
            o = F.scaled_dot_product_attention(*layer.split_heads(z.detach()), is_causal=True)
            y = x + layer.proj(layer.merge_heads(o))
            own, values = [[layer.ln, layer.qkv], [layer.proj]], [z, y]
        else:
            g = F.gelu(layer.fc1(layer.ln(x)))
            y = x + layer.fc2(g.detach())
            own, values = [[layer.ln, layer.fc1], [layer.fc2]], [g, y]
    for mods, v, d in zip(own, values, deltas):
        params = [p for m in mods for p in m.parameters()]
        for p, gp in zip(params, torch.autograd.grad((v * d).sum(), params)):
            grads[p] = gp
    return grads


@pytest.mark.parametrize("model_name", ["resnet", "transformer-macro", "transformer-micro"])
def test_dfa_with_layer_points_matches_the_closed_form(model_name):
    """One SGD step (lr 1) of DFA with layer points: every weight of a block with points moves
    by minus autograd of <e B_p, point p> over that weight's own layer, with e the error at the
    logits (ResNet) or at the head's input (language model)."""
    if model_name == "resnet":
        model, extra = resnet(), ["feedback.conv=channel"]
        x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 4, 2])
    else:
        model = transformer(model_name.split("-")[1])
        extra = ["data.name=shakespeare", "model.name=transformer"]
        x, y = tokens(3), tokens(3, seed=1)
    old, new, rule = one_step(sgd_config("dfa", "feedback.points=layer", *extra), model, x, y)
    b = rule.feedback_matrices()
    ref = copy.deepcopy(model)
    # The error: at the logits, or the exact gradient at the head's input.
    blocks = list(ref.blocks)
    hs, h = [], x
    for block in blocks[:-1]:
        h = block(h).detach()
        hs.append(h)
    head_in = hs[-1].requires_grad_()
    logits = blocks[-1](head_in)
    c = logits.shape[-1]
    loss = F.cross_entropy(logits.reshape(-1, c), y.reshape(-1))
    if model.signal_spec.at_head_input:
        e = torch.autograd.grad(loss, head_in)[0].reshape(-1, D)
    else:
        e = (F.softmax(logits, -1) - F.one_hot(y, c)).detach() / len(y)
    pts = ref.feedback_points(layer=True)
    names = {id(p): n for n, p in ref.named_parameters()}
    checked = 0
    h = x
    for i, block in enumerate(blocks[:-1]):
        here = [p for p in pts if p.block == i]
        if here[0].tap is not None:
            j = 0
            for layer in block:
                out = layer(h)
                deltas = []
                for p in here[j:j + 2]:
                    d = e @ b[p.index]
                    shape = (len(x), *p.shape)
                    deltas.append(d.reshape(len(x), -1, 1, 1).expand(shape)
                                  if d.numel() != torch.Size(shape).numel() else d.reshape(shape))
                for param, grad in _layer_update(layer, h, deltas).items():
                    key = names[id(param)]
                    torch.testing.assert_close(old[key] - new[key], grad, rtol=1e-7, atol=1e-10)
                    checked += 1
                h, j = out.detach(), j + 2
        else:
            h = block(h).detach()
    assert checked >= 8
