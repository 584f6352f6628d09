"""Each learning rule's update against an independent computation of its definition."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import ACTS, one_step, sgd_config, tiny_cnn, tiny_mlp
from torch.func import functional_call, grad

from grape_dist.rng import keyed_generator
from grape_dist.rules import build_stage_rule

# Every test in float64 (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("float64")


def _data(n=6, d_in=5, d_out=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g), torch.randint(0, d_out, (n,), generator=g)


def _sigma(act: str):
    """(activation, its derivative written from the activation's output h = sigma(a))."""
    if act == "tanh":
        return torch.tanh, lambda h: 1 - h**2
    return torch.relu, lambda h: (h > 0).double()


def _forward_parts(model, x, act="tanh"):
    """h_l of the tiny MLP computed by hand from its weights."""
    sigma, _ = _sigma(act)
    (w1, b1), (w2, b2), (w3, b3) = [(b[0].weight, b[0].bias) for b in model.blocks]
    h1 = sigma(x @ w1.T + b1)
    h2 = sigma(h1 @ w2.T + b2)
    logits = h2 @ w3.T + b3
    return h1, h2, logits


def _dense_dfa_step(model, x, e, b, act):
    """Eq. 2 for the tiny MLP: delta_a_l = (B_l^T e) * sigma'(a_l), dW_l = -delta_a_l h^T."""
    _, dsigma = _sigma(act)
    h1, h2, _ = _forward_parts(model, x, act)
    d1 = (e @ b[0]) * dsigma(h1)
    d2 = (e @ b[1]) * dsigma(h2)
    return {
        "blocks.0.0.weight": -d1.T @ x, "blocks.0.0.bias": -d1.sum(0),
        "blocks.1.0.weight": -d2.T @ h1, "blocks.1.0.bias": -d2.sum(0),
        "blocks.2.0.weight": -e.T @ h2, "blocks.2.0.bias": -e.sum(0),
    }


def _conv_dfa_step(model, x, e, b):
    """The DFA update of `tiny_cnn` written out with im2col (F.unfold), no autograd: the
    projected signal at each block output, through the pool (max: to the window's arg-max;
    average: spread evenly), times the activation's derivative, against the input patches.
    A channel-shared B (one column per channel) gives each channel one value at all its
    positions."""
    (w1, b1), (w2, b2), (w3, b3) = [(blk[i].weight, blk[i].bias) for blk, i in
                                    zip(model.blocks, (0, 0, 1))]
    n = len(x)
    a1 = F.conv2d(x, w1, b1, padding=1)
    r1 = torch.relu(a1)
    win = r1.unfold(2, 2, 2).unfold(3, 2, 2).reshape(n, 3, 4, 4, 4)  # 2x2 windows
    h1 = win.max(-1).values
    a2 = F.conv2d(h1, w2, b2)
    t2 = torch.tanh(a2)
    h2 = t2.mean((2, 3), keepdim=True)
    # block 1: max pool routes each window's signal to its (first) arg-max
    dh1 = e @ b[0]
    dh1 = dh1.reshape(n, 3, 4, 4) if dh1.shape[1] == 48 else dh1[..., None, None].repeat(1, 1, 4, 4)
    pick = F.one_hot(win.argmax(-1), 4).double() * dh1[..., None]  # (n, 3, 4, 4, 4)
    dr1 = pick.reshape(n, 3, 4, 4, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(n, 3, 8, 8)
    da1 = dr1 * (a1 > 0).double()
    cols1 = F.unfold(x, 3, padding=1)  # (n, 2*9, 64)
    dw1 = torch.einsum("nop,nkp->ok", da1.reshape(n, 3, -1), cols1).reshape(w1.shape)
    # block 2: average pool spreads the signal over its 2x2 window
    dh2 = (e @ b[1]).reshape(n, 4, 1, 1)
    da2 = dh2.expand(n, 4, 2, 2) / 4 * (1 - t2**2)
    cols2 = F.unfold(h1, 3)  # (n, 3*9, 4)
    dw2 = torch.einsum("nop,nkp->ok", da2.reshape(n, 4, -1), cols2).reshape(w2.shape)
    return {
        "blocks.0.0.weight": -dw1, "blocks.0.0.bias": -da1.sum((0, 2, 3)),
        "blocks.1.0.weight": -dw2, "blocks.1.0.bias": -da2.sum((0, 2, 3)),
        "blocks.2.1.weight": -e.T @ h2.flatten(1), "blocks.2.1.bias": -e.sum(0),
    }


def _error(logits, y):
    return (F.softmax(logits, 1) - F.one_hot(y, logits.shape[1]).double()) / len(y)


def _check(old, new, expected):
    for key, delta in expected.items():
        torch.testing.assert_close(new[key] - old[key], delta, rtol=1e-9, atol=1e-12)


def test_bp_equals_autograd():
    for model in (tiny_mlp().double(), tiny_cnn().double()):
        x = torch.randn(4, *model.input_shape)
        y = torch.randint(0, 3, (4,))
        params = {k: v.detach() for k, v in model.named_parameters()}
        ref = copy.deepcopy(model)

        def loss_fn(p, ref=ref, x=x, y=y):
            return F.cross_entropy(functional_call(ref, p, (x,)), y)

        g = grad(loss_fn)(params)
        old, new, _ = one_step(sgd_config("bp"), model, x, y)
        _check(old, new, {k: -v for k, v in g.items()})


@pytest.mark.parametrize("act", ["relu", "tanh"])
def test_dfa_matches_closed_form_dense(act):
    model = tiny_mlp(act=ACTS[act]).double()
    x, y = _data(n=16)
    old, new, rule = one_step(sgd_config("dfa"), model, x, y)
    b = rule.feedback_matrices()  # DFA never changes B
    e = _error(_forward_parts(model, x, act)[2], y)
    _check(old, new, _dense_dfa_step(model, x, e, b, act))


@pytest.mark.parametrize("conv,columns", [("full", 48), ("channel", 3)])
def test_dfa_matches_closed_form_conv(conv, columns):
    model = tiny_cnn().double()
    x = torch.randn(5, 2, 8, 8)
    y = torch.tensor([0, 1, 2, 1, 0])
    old, new, rule = one_step(sgd_config("dfa", f"feedback.conv={conv}"), model, x, y)
    b = rule.feedback_matrices()
    assert b[0].shape == (3, columns)
    e = _error(model(x), y)
    _check(old, new, _conv_dfa_step(model, x, e, b))


def test_drtp_projects_the_target():
    model = tiny_mlp().double()
    x, y = _data()
    old, new, rule = one_step(sgd_config("drtp"), model, x, y)
    b = rule.feedback_matrices()
    h1, h2, logits = _forward_parts(model, x)
    e = _error(logits, y)
    t = -F.one_hot(y, 3).double() / len(y)
    d1 = (t @ b[0]) * (1 - h1**2)
    d2 = (t @ b[1]) * (1 - h2**2)
    _check(old, new, {
        "blocks.0.0.weight": -d1.T @ x, "blocks.1.0.weight": -d2.T @ h1,
        "blocks.2.0.weight": -e.T @ h2,
    })


def test_fa_replaces_weights_by_fixed_feedback_in_the_backward_chain():
    model = tiny_mlp().double()
    x, y = _data()
    old, new, rule = one_step(sgd_config("fa"), model, x, y)
    fb2 = rule.blocks[1][0].feedback.double()  # replaces W2 when propagating to h1
    fb3 = rule.blocks[2][0].feedback.double()  # replaces W3 when propagating to h2
    assert not torch.allclose(fb3, old["blocks.2.0.weight"])
    h1, h2, logits = _forward_parts(model, x)
    e = _error(logits, y)
    d2 = (e @ fb3) * (1 - h2**2)  # delta a_l = (B_{l+1} delta a_{l+1}) * sigma'(a_l)
    d1 = (d2 @ fb2) * (1 - h1**2)
    _check(old, new, {
        "blocks.0.0.weight": -d1.T @ x, "blocks.1.0.weight": -d2.T @ h1,
        "blocks.2.0.weight": -e.T @ h2, "blocks.2.0.bias": -e.sum(0),
    })


def test_fa_conv_uses_feedback_kernel():
    model = tiny_cnn().double()
    x = torch.randn(3, 2, 8, 8)
    y = torch.tensor([0, 1, 2])
    old, new, rule = one_step(sgd_config("fa"), model, x, y)
    # Independent: autograd on a model whose conv2 backward-to-input uses the feedback kernel,
    # written as conv(x, W) = conv(x, W - K).detach() + conv(x, K) with weight grads via W.
    conv1, conv2 = rule.blocks[0][0], rule.blocks[1][0]
    lin = rule.blocks[2][1]
    w1, w2, w3 = (old[f"blocks.{i}.weight"].clone().requires_grad_() for i in ("0.0", "1.0",
                                                                             "2.1"))
    b1, b2, b3 = (old[f"blocks.{i}.bias"] for i in ("0.0", "1.0", "2.1"))

    def fa_conv(inp, w, b, k, pad):
        out_w = F.conv2d(inp.detach(), w, b, padding=pad)  # weight gradient path
        out_x = F.conv2d(inp, k, None, padding=pad)  # input gradient path with K
        return out_w + out_x - out_x.detach()

    def fa_lin(inp, w, b, k):
        return F.linear(inp.detach(), w, b) + F.linear(inp, k) - F.linear(inp, k).detach()

    h = F.max_pool2d(F.relu(fa_conv(x, w1, b1, conv1.feedback.double(), 1)), 2)
    h = F.avg_pool2d(torch.tanh(fa_conv(h, w2, b2, conv2.feedback.double(), 0)), 2)
    logits = fa_lin(h.flatten(1), w3, b3, lin.feedback.double())
    F.cross_entropy(logits, y).backward()
    _check(old, new, {"blocks.0.0.weight": -w1.grad, "blocks.1.0.weight": -w2.grad,
                      "blocks.2.1.weight": -w3.grad})


def test_pepita_matches_closed_form():
    model = tiny_mlp().double()
    x, y = _data()
    old, new, rule = one_step(sgd_config("pepita"), model, x, y)
    f = rule.F.double()
    h1, h2, logits = _forward_parts(model, x)
    e = _error(logits, y)
    x_err = x - (e * len(y)) @ f.T  # h_0^err = x - F e
    h1e, h2e, _ = _forward_parts(model, x_err)
    n = len(y)
    _check(old, new, {
        "blocks.0.0.weight": -((h1 - h1e) / n).T @ x_err,
        "blocks.1.0.weight": -((h2 - h2e) / n).T @ h1e,
        "blocks.2.0.weight": -e.T @ h2e,
    })


def _eq17_reference(b, j, lr, eps):
    """Eq. 17 column by column, then the column renormalisation of section 3.3."""
    n = b.shape[1]
    out = b.clone()
    for k in range(n):
        bk, jk = b[:, k], j[:, k]
        nb, nj = bk.norm(), jk.norm()
        out[:, k] = bk + lr / n * (jk / (nb * nj) - (bk @ jk) * bk / (nb**3 * nj))
        out[:, k] = out[:, k] / (out[:, k].norm() + eps)
    return out


def _per_sample_jacobians(model, x, block):
    """d logits_s / d h_block,s for every sample (N, d_out, n_l), by reverse-mode autograd."""
    from torch.func import jacrev, vmap
    rest = list(model.blocks)[block + 1:]
    h = x
    for b in list(model.blocks)[:block + 1]:
        h = b(h)

    def tail(v):
        v = v.unsqueeze(0)
        for b in rest:
            v = b(v)
        return v.squeeze(0)

    jac = vmap(jacrev(tail))(h.detach())
    return jac.reshape(len(x), model.num_classes, -1)


MODELS = {
    "mlp-relu": lambda: (tiny_mlp(act=torch.nn.ReLU).double(), _data(n=16)),
    "mlp-tanh": lambda: (tiny_mlp().double(), _data(n=16)),
    "cnn": lambda: (tiny_cnn().double(),
                    (torch.randn(5, 2, 8, 8, generator=torch.Generator().manual_seed(2)),
                     torch.tensor([0, 1, 2, 1, 0]))),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_b_step_equals_eq17_then_dfa_step_with_refined_b(name):
    """GrAPE's chain on one mini-batch: J_hat from the keyed tangents and exact per-sample
    Jacobians (jacrev), the B step of eq. 17 column by column, renormalised; then the weight
    step equals the closed-form DFA update with the refined B."""
    model, (x, y) = MODELS[name]()
    lr, eps = 3.0, 1e-8
    cfg = sgd_config("grape", "grape.b_optim.name=sgd", f"grape.b_optim.lr={lr}",
                     "grape.b_optim.momentum=0.0", "grape.routing=per_block")
    b0 = build_stage_rule(cfg, copy.deepcopy(model), 0, 3).feedback_matrices()
    old, new, rule = one_step(cfg, model, x, y)
    b1 = rule.feedback_matrices()
    for i in (0, 1):
        shape = model.blocks[i].out_shape
        p = torch.randn(len(y), *shape, generator=keyed_generator(cfg.seed, "tangent", 0, i))
        p = p.double().reshape(len(y), -1)
        g = torch.einsum("son,sn->so", _per_sample_jacobians(model, x, i), p)
        j_hat = g.T @ p
        torch.testing.assert_close(b1[i], _eq17_reference(b0[i], j_hat, lr, eps))
    e = _error(model(x), y)
    if name == "cnn":
        expected = _conv_dfa_step(model, x, e, b1)
    else:
        expected = _dense_dfa_step(model, x, e, b1, name.split("-")[1])
    _check(old, new, expected)


def test_alignment_loss_gradient_matches_autograd():
    from grape_dist.rules.feedback import alignment_loss_grad
    b = torch.randn(4, 7, requires_grad=True)
    j = torch.randn(4, 7)
    loss = 1 - F.cosine_similarity(b, j, dim=0).mean()
    loss.backward()
    ref_loss, g = alignment_loss_grad(b.detach(), j)
    torch.testing.assert_close(g, b.grad)
    torch.testing.assert_close(ref_loss, loss.detach())


def test_b_step_raises_the_column_cosine_with_a_fixed_estimate():
    """Repeated B steps against one fixed J_hat: the mean column cosine of eq. 6 rises at every
    step towards 1, and the columns stay unit-norm."""
    from grape_dist.config import GrapeConfig, OptimConfig
    from grape_dist.optim import build_optimizer
    from grape_dist.rules.feedback import init_feedback
    from grape_dist.rules.grape import FeedbackLearner

    g = torch.Generator().manual_seed(3)
    b = torch.nn.Parameter(init_feedback(4, 9, g), requires_grad=False)
    cfg = GrapeConfig(b_optim=OptimConfig(name="sgd", lr=2.0, momentum=0.0, fused=False))
    learner = FeedbackLearner({0: b}, cfg, 0, build_optimizer([b], cfg.b_optim), num_hidden=1)
    tangents = torch.randn(1, 6, 4, generator=g)  # (streams, rows, d_out)
    p = torch.randn(6, 9, generator=g)
    j_hat = tangents[0].T @ p

    def mean_cos():
        return float(F.cosine_similarity(b.detach(), j_hat, dim=0).mean())

    cos = [mean_cos()]
    for _ in range(30):
        learner.accumulate(0, tangents, p)
        learner.step()
        cos.append(mean_cos())
        torch.testing.assert_close(b.detach().norm(dim=0), torch.ones(9))
    assert all(b > a for a, b in zip(cos, cos[1:])), cos
    assert cos[0] < 0.5 < 0.99 < cos[-1], cos
