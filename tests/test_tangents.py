"""The forward-mode tangents and GrAPE's Jacobian estimator against exact Jacobians."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import sgd_config, tiny_cnn, tiny_mlp
from torch import nn
from torch.func import jacrev, jvp, vmap

from grape_dist.models import Block
from grape_dist.rules import MicroBatch, build_stage_rule, output_signal
from grape_dist.rules.tangents import block_forward, generic_layer_forward, layer_forward


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


LAYERS = [
    (nn.Linear(6, 4), (6,)),
    (nn.Conv2d(2, 3, 3, padding=1, stride=2), (2, 7, 7)),
    (nn.ReLU(), (5,)),
    (nn.Tanh(), (5,)),
    (nn.MaxPool2d(2), (3, 6, 6)),
    (nn.MaxPool2d(3, stride=2, padding=1), (2, 7, 7)),
    (nn.AvgPool2d(2), (3, 6, 6)),
    (nn.Flatten(), (2, 3, 3)),
    (nn.LayerNorm(5), (5,)),  # no fast rule: the forward-AD fallback
]


@pytest.mark.parametrize("layer,shape", LAYERS, ids=[type(m).__name__ for m, _ in LAYERS])
def test_layer_tangents_match_torch_func_jvp(layer, shape):
    layer = layer.double()
    x = torch.randn(5, *shape)
    t = torch.randn(3, 4, *shape)  # 3 streams on the first 4 samples
    y, tt = layer_forward(layer, x, t)
    torch.testing.assert_close(y, layer(x))
    for k in range(3):
        _, ref = jvp(layer, (x[:4],), (t[k],))
        torch.testing.assert_close(tt[k], ref)
    _, tg = generic_layer_forward(layer, x, t)
    torch.testing.assert_close(tg, tt)


def test_block_forward_keeps_primal_graph_and_no_tangent_graph():
    block = Block("b", nn.Linear(4, 3), nn.ReLU()).double()
    x = torch.randn(2, 4)
    y, t = block_forward(block, x, torch.randn(1, 2, 4))
    assert y.requires_grad and not t.requires_grad


def _collect_estimates(cfg, model, x, y, draws):
    """J_hat of each hidden block at fixed weights, over `draws` independent tangent draws."""
    rule = build_stage_rule(cfg, copy.deepcopy(model), 0, len(model.blocks))
    out = {i: [] for i in rule.feedback_matrices()}
    for step in range(draws):
        mb = MicroBatch(step, 0, 0, len(y), len(y))
        h, t = rule.forward(mb, x, None)
        _, _, signal = output_signal(h, y, len(y), t)
        rule.backward(mb, signal, None)
        for i, j in rule.jacobian_estimates().items():
            out[i].append(j)
        rule.reset_step()
    return {i: torch.stack(v) for i, v in out.items()}


def _true_jacobians(model, x, pre_activation=False):
    """sum_s d logits_s / d h_l,s (or d a_l,s for the pre-activation) for every hidden block."""
    blocks = list(model.blocks)
    out = {}
    for i in range(len(blocks) - 1):
        h = x
        for b in blocks[:i]:
            h = b(h)
        if pre_activation:
            h = blocks[i][0](h)
            head = [blocks[i][1]] + blocks[i + 1:]
        else:
            h = blocks[i](h)
            head = blocks[i + 1:]

        def tail(v, head=head):
            v = v.unsqueeze(0)
            for b in head:
                v = b(v)
            return v.squeeze(0)

        out[i] = vmap(jacrev(tail))(h.detach()).sum(0).reshape(model.num_classes, -1)
    return out


@pytest.mark.parametrize("routing", ["per_block", "shared"])
def test_activation_space_estimator_is_unbiased(routing):
    model = tiny_mlp(d_in=4, h1=5, h2=4, d_out=3).double()
    x = torch.randn(2, 4)
    y = torch.tensor([0, 2])
    cfg = sgd_config("grape", f"grape.routing={routing}", "grape.tangent_space=activation")
    est = _collect_estimates(cfg, model, x, y, 4000)
    for i, j in _true_jacobians(model, x).items():
        mean = est[i].mean(0)
        rel = float((mean - j).norm() / j.norm())
        assert rel < 0.1, (i, rel)


def test_weight_space_estimator_is_unbiased_for_the_pre_activation_jacobian():
    model = tiny_mlp(d_in=3, h1=4, h2=3, d_out=2).double()
    x = torch.randn(2, 3)
    y = torch.tensor([0, 1])
    cfg = sgd_config("grape", "grape.tangent_space=weight")
    est = _collect_estimates(cfg, model, x, y, 6000)
    for i, j in _true_jacobians(model, x, pre_activation=True).items():
        rel = float((est[i].mean(0) - j).norm() / j.norm())
        assert rel < 0.1, (i, rel)


def test_rank1_estimator_mean_frobenius_cosine_exceeds_eq4_bound():
    # One sample, per-block tangents: cos_F(J, (Jp)p^T) = |J s| / |J|_F (section 3.2).
    model = tiny_cnn().double()
    x = torch.randn(1, 2, 8, 8)
    y = torch.tensor([1])
    cfg = sgd_config("grape", "grape.tangent_space=activation")
    est = _collect_estimates(cfg, model, x, y, 3000)
    for i, j in _true_jacobians(model, x).items():
        n = j.shape[1]
        cos = torch.stack([(e * j).sum() / (e.norm() * j.norm()) for e in est[i]])
        bound = math.sqrt(2 / (math.pi * n)) * torch.linalg.matrix_norm(j, 2) / j.norm()
        assert float(cos.mean()) > float(bound), (i, float(cos.mean()), float(bound))
        rel = float((est[i].mean(0) - j).norm() / j.norm())
        assert rel < 0.15, (i, rel)


def test_weight_space_is_refused_for_conv_blocks():
    model = tiny_cnn().double()
    cfg = sgd_config("grape", "grape.tangent_space=weight")
    with pytest.raises(ValueError, match="start with a Linear"):
        build_stage_rule(cfg, model, 0, len(model.blocks))


@pytest.mark.parametrize("layer,shape", LAYERS[:2], ids=["Linear", "Conv2d"])
def test_fused_tangent_forward_keeps_exact_gradients(layer, shape):
    layer = layer.double()
    x = torch.randn(5, *shape, requires_grad=True)
    y, _ = layer_forward(layer, x, torch.randn(2, 3, *shape))
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, [x, *layer.parameters()], g)
    ref = torch.autograd.grad(layer(x), [x, *layer.parameters()], g)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b)
