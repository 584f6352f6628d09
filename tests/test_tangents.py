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

# Every test in float64 (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("float64")


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
        for i, j in rule.learner.jacobian_estimates().items():
            out[i].append(j)
        rule.reset_step()
    return {i: torch.stack(v) for i, v in out.items()}


def _true_jacobians(model, x):
    """sum_s d logits_s / d h_l,s for every hidden block."""
    blocks = list(model.blocks)
    out = {}
    for i in range(len(blocks) - 1):
        h = x
        for b in blocks[:i + 1]:
            h = b(h)
        head = blocks[i + 1:]

        def tail(v, head=head):
            v = v.unsqueeze(0)
            for b in head:
                v = b(v)
            return v.squeeze(0)

        out[i] = vmap(jacrev(tail))(h.detach()).sum(0).reshape(model.num_classes, -1).detach()
    return out


@pytest.mark.parametrize("routing", ["per_block", "shared"])
def test_activation_space_estimator_is_unbiased(routing):
    model = tiny_mlp(d_in=4, h1=5, h2=4, d_out=3).double()
    x = torch.randn(2, 4)
    y = torch.tensor([0, 2])
    cfg = sgd_config("grape", f"grape.routing={routing}")
    est = _collect_estimates(cfg, model, x, y, 4000)
    for i, j in _true_jacobians(model, x).items():
        mean = est[i].mean(0)
        rel = float((mean - j).norm() / j.norm())
        assert rel < 0.1, (i, rel)


def test_channel_shared_estimator_is_unbiased_for_the_position_summed_jacobian():
    """feedback.conv=channel: tangents drawn per channel and repeated over positions give
    J_hat = g q^T, unbiased for J P (P sums each channel's positions)."""
    model = tiny_cnn().double()
    x = torch.randn(2, 2, 8, 8)
    y = torch.tensor([1, 2])
    cfg = sgd_config("grape", "feedback.conv=channel")
    est = _collect_estimates(cfg, model, x, y, 4000)
    true = _true_jacobians(model, x)
    assert est[0].shape[1:] == (3, 3)  # conv1: C = 3 columns instead of 3 x 4 x 4
    for i, j in true.items():
        c = model.blocks[i].out_shape[0]
        pm = torch.eye(c).repeat_interleave(j.shape[1] // c, dim=0)
        rel = float((est[i].mean(0) - j @ pm).norm() / (j @ pm).norm())
        assert rel < 0.1, (i, rel)


def test_rank1_estimator_mean_frobenius_cosine_exceeds_eq4_bound():
    # One sample, per-block tangents: cos_F(J, (Jp)p^T) = |J s| / |J|_F (section 3.2).
    model = tiny_cnn().double()
    x = torch.randn(1, 2, 8, 8)
    y = torch.tensor([1])
    cfg = sgd_config("grape")
    est = _collect_estimates(cfg, model, x, y, 3000)
    for i, j in _true_jacobians(model, x).items():
        n = j.shape[1]
        cos = torch.stack([(e * j).sum() / (e.norm() * j.norm()) for e in est[i]])
        bound = math.sqrt(2 / (math.pi * n)) * torch.linalg.matrix_norm(j, 2) / j.norm()
        assert float(cos.mean()) > float(bound), (i, float(cos.mean()), float(bound))
        rel = float((est[i].mean(0) - j).norm() / j.norm())
        assert rel < 0.15, (i, rel)


@pytest.mark.parametrize("total,m,d", [(10, 4, 1), (7, 7, 1), (9, 2, 1), (64, 5, 1), (3, 0, 1),
                                       (10, 4, 3), (5, 0, 2)])
def test_tangent_rows_are_chosen_per_mini_batch(total, m, d):
    """The tangent rows of a mini-batch are the same global rows, drawn the same numbers,
    whatever the micro-batching: every split covers them once, in order (each row d times with
    d directions)."""
    from grape_dist.rules.grape import tangent_rows
    from grape_dist.runtime import split_micro_batches
    expected = list(range(total)) if m == 0 else [k * total // m for k in range(m)]
    expected = [r for r in expected for _ in range(d)]
    for micro in (1, 2, 3, total):
        rows, ks = [], []
        for j, (start, size) in enumerate(split_micro_batches(total, micro)):
            k0, k1, local = tangent_rows(MicroBatch(0, j, start, size, total), m, d)
            idx = torch.arange(size)[local]
            rows += (idx + start).tolist()
            ks += list(range(k0, k1))
            assert len(idx) == k1 - k0
        assert rows == expected, (micro, rows)
        assert ks == list(range(len(expected)))


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


def test_more_directions_per_sample_give_a_closer_estimate():
    """grape.directions = K: J_hat sums K rank-1 terms per tangent row; it stays unbiased and
    its Frobenius cosine to the true Jacobian rises with K (variance ~ 1/K)."""
    model = tiny_mlp(d_in=6, h1=8, h2=6, d_out=3).double()
    x = torch.randn(2, 6)
    y = torch.tensor([0, 2])
    true = _true_jacobians(model, x)
    cos = {}
    for k in (1, 8):
        est = _collect_estimates(sgd_config("grape", f"grape.directions={k}"), model, x, y,
                                 400)
        cos[k] = {i: float(torch.stack([(e * j).sum() / (e.norm() * j.norm())
                                        for e in est[i]]).mean()) for i, j in true.items()}
        for i, j in true.items():  # unbiased: the scale is K times one direction's
            rel = float((est[i].mean(0) / k - j).norm() / j.norm())
            assert rel < 0.25, (k, i, rel)
    for i in true:
        assert cos[8][i] > cos[1][i] + 0.15, (i, cos)
