"""The calibration step's forms against independent computations, and its safety on a model
trained by a direct rule (issue 17): the paper's single SGD step can raise the training loss of
such a model several-fold; the shipped default must not."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import SHARED_DATA

from grape_dist.config import load_config
from grape_dist.data import random_batch_indices
from grape_dist.data.sampling import subset_indices
from grape_dist.trainer import Tensors, Trainer

SMALL = ["rule=dfa", "train.epochs=1", "data.train_subset=256", "data.test_subset=64",
         "train.progress=false", "model.hidden=[16]", "calibration.every_epochs=1",
         "calibration.batch_size=32"]


def _exact_grads(trainer: Trainer, epoch: int) -> list[torch.Tensor]:
    """Autograd's gradient of the mean loss on the calibration batch of `epoch`."""
    idx = random_batch_indices(len(trainer.train.y), trainer.cfg.calibration.batch_size,
                               trainer.cfg.seed, epoch)
    loss = F.cross_entropy(trainer.model(trainer.inputs(trainer.train.x[idx])),
                           trainer.train.y[idx])
    return list(torch.autograd.grad(loss, list(trainer.model.parameters())))


def test_bounded_paper_step_is_the_sgd_step_scaled_into_the_trust_region():
    """max_update = r: each tensor moves along -g by min(lr |g|, r |W|)."""
    lr, r = 0.5, 0.02
    cfg = load_config(None, [*SMALL, "calibration.form=paper", f"calibration.optim.lr={lr}",
                             f"calibration.max_update={r}", "calibration.line_search=0"])
    trainer = Trainer(cfg, None)
    trainer.train_epoch(1)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    grads = _exact_grads(trainer, 1)
    trainer.calibrate(1)
    clipped = 0
    for p, w, g in zip(trainer.model.parameters(), before, grads):
        size = min(lr * float(g.norm()), r * float(w.norm()))
        clipped += lr * float(g.norm()) > r * float(w.norm())
        torch.testing.assert_close(p.detach(), w - g * (size / float(g.norm())))
    assert clipped, "no tensor reached the bound: the test would not see the clipping"


def test_optimizer_form_is_one_step_of_the_weights_own_optimiser():
    """form=optimizer: the exact gradient through the rule's Adam, its moments and step count
    kept: the same as stepping a copy of that optimiser on autograd's gradient."""
    cfg = load_config(None, [*SMALL, "calibration.form=optimizer", "calibration.max_update=0",
                             "calibration.line_search=0", "optim.name=adam",
                             "optim.lr=0.003"])
    trainer = Trainer(cfg, None)
    trainer.train_epoch(1)
    rule_opt = trainer.engine.stages[0].rule.optimizer
    params = list(trainer.model.parameters())
    twins = [p.detach().clone().requires_grad_(True) for p in params]
    twin_opt = torch.optim.Adam(twins, lr=0.003, weight_decay=cfg.optim.weight_decay)
    state = copy.deepcopy(rule_opt.state_dict())
    twin_opt.load_state_dict(copy.deepcopy(state))
    assert state["state"], "the rule's optimiser has no state yet: the test would not see it"
    for twin, g in zip(twins, _exact_grads(trainer, 1)):
        twin.grad = g
    twin_opt.step()
    trainer.calibrate(1)
    for p, twin in zip(params, twins):
        torch.testing.assert_close(p.detach(), twin.detach())
    # The rule's optimiser took the step: its state moved on.
    assert rule_opt.state_dict()["state"][0]["step"] == state["state"][0]["step"] + 1


@pytest.fixture(scope="module")
def trained_dfa():
    """The MNIST MLP (784-256-256-10, Tanh) after one epoch of DFA with Adam on 5,000 images,
    and the training loss (eval mode) on 2,000 of them."""
    cfg = load_config("configs/mnist_mlp_dfa.yaml", [
        "train.epochs=1", "data.train_subset=5000", "train.progress=false",
        "calibration.every_epochs=1", "train.threads=1"])
    trainer = Trainer(cfg, None)
    trainer.train_epoch(1)
    idx = subset_indices(len(trainer.train.y), 2000, 7)
    rows = Tensors(trainer.train.x[idx], trainer.train.y[idx])
    weights = copy.deepcopy(trainer.model.state_dict())
    return trainer, rows, weights, trainer.evaluate(rows)[0]


def _loss_after_calibration(trained_dfa, *overrides: str, check=None) -> float:
    """The training loss after one calibration with `overrides`, from the trained weights;
    `check(trainer)` runs on the calibrated model before the weights are put back."""
    from grape_dist.rules import build_calibration_rule

    trainer, rows, weights, _ = trained_dfa
    trainer.model.load_state_dict(weights)
    cfg = load_config("configs/mnist_mlp_dfa.yaml", ["calibration.every_epochs=1", *overrides])
    stage = trainer.engine.stages[0]
    saved_cfg, saved_cal = trainer.cfg, stage.calibration
    trainer.cfg = cfg
    stage.calibration = build_calibration_rule(cfg, trainer.engine.model, stage.first,
                                               stage.last, rule=stage.rule)
    try:
        trainer.calibrate(1)
        if check is not None:
            check(trainer)
        return trainer.evaluate(rows)[0]
    finally:
        trainer.cfg, stage.calibration = saved_cfg, saved_cal
        trainer.model.load_state_dict(weights)


def test_the_papers_step_raises_the_training_loss_of_a_dfa_trained_model(trained_dfa):
    """What the default guards against, in this very setup: one SGD(0.9) lr 0.01 step on 128
    rows more than doubles the training loss (the output layer's step is 4 % of its weights,
    against 0.06 % for a training step: experiments/calibration_step.py)."""
    loss0 = trained_dfa[3]
    assert _loss_after_calibration(trained_dfa, "calibration.form=paper",
                                   "calibration.max_update=0", "calibration.line_search=0") \
        > 1.5 * loss0


def test_default_calibration_does_not_raise_the_training_loss(trained_dfa):
    loss0 = trained_dfa[3]
    assert _loss_after_calibration(trained_dfa) < 1.05 * loss0


def _batch_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


@pytest.mark.parametrize("check_rows", [0, 1000])
def test_line_search_keeps_the_length_with_the_lowest_check_loss(trained_dfa, check_rows):
    """calibration.line_search=k, computed independently: d = -lr g (autograd's gradient on the
    calibration batch, the paper's unbounded step); the weights become W + s d for the s in
    0, 1, 1/2, ..., 1/2^k with the lowest mean loss on the check rows. The check rows: the
    first `check_rows` of a permutation keyed (seed, epoch) that are not in the calibration
    batch, or the batch itself for 0."""
    trainer, _, weights, _ = trained_dfa
    lr, k, n, seed = 0.01, 4, len(trainer.train.y), trainer.cfg.seed
    idx = random_batch_indices(n, trainer.cfg.calibration.batch_size, seed, 1)
    x, y = trainer.inputs(trainer.train.x[idx]), trainer.train.y[idx]
    check = idx
    if check_rows:
        order = random_batch_indices(n, n, seed, 1, stream="calibration check").tolist()
        check = torch.tensor([i for i in order if i not in set(idx.tolist())][:check_rows])
    cx, cy = trainer.inputs(trainer.train.x[check]), trainer.train.y[check]
    trainer.model.load_state_dict(weights)
    twin = copy.deepcopy(trainer.model)
    start = [p.detach().clone() for p in twin.parameters()]
    grads = torch.autograd.grad(F.cross_entropy(twin(x), y), list(twin.parameters()))

    def at(scale: float) -> float:
        with torch.no_grad():
            for p, w, g in zip(twin.parameters(), start, grads):
                p.copy_(w - scale * lr * g)
        return _batch_loss(twin, cx, cy)

    losses = {scale: at(scale) for scale in [0.0] + [0.5 ** j for j in range(k + 1)]}
    want = min(losses, key=losses.get)
    assert 0 < want < 1, f"{losses}: the test would not see a shortened step"
    at(want)

    def check(trainer: Trainer) -> None:
        event = trainer.state.calibrations.pop()
        assert event.scale == want
        assert event.loss_before == pytest.approx(losses[0.0], rel=1e-5)
        assert event.loss_after == pytest.approx(losses[want], rel=1e-5)
        for p, q in zip(trainer.model.parameters(), twin.parameters()):
            torch.testing.assert_close(p.detach(), q.detach())

    _loss_after_calibration(trained_dfa, "calibration.form=paper", "calibration.max_update=0",
                            f"calibration.line_search={k}", f"calibration.optim.lr={lr}",
                            f"calibration.check_rows={check_rows}", check=check)


def test_a_step_no_length_helps_is_undone_with_batchnorm_statistics():
    """A step far too long at every scale tried leaves the model exactly as it was, BatchNorm
    running statistics included (the step's own forward moved them)."""
    if not (SHARED_DATA / "cifar10").is_dir():
        pytest.skip(f"CIFAR-10 is not in {SHARED_DATA}")
    cfg = load_config(None, [
        "rule=dfa", "model.name=resnet", "model.depth=8", "data.name=cifar10",
        f"data.root={SHARED_DATA}",
        "data.train_subset=128", "data.test_subset=64", "data.batch_size=32",
        "train.progress=false", "train.threads=1", "calibration.every_epochs=1",
        "calibration.batch_size=32", "calibration.form=paper", "calibration.max_update=0",
        "calibration.line_search=1", "calibration.optim.lr=100"])
    trainer = Trainer(cfg, None)
    trainer.train_epoch(1)
    before = copy.deepcopy(trainer.model.state_dict())
    assert any("running_mean" in k for k in before)
    trainer.calibrate(1)
    event = trainer.state.calibrations[-1]
    assert event.scale == 0 and event.loss_after == event.loss_before
    for k, v in trainer.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_a_language_models_check_loss_is_per_token():
    """The check rows' loss is logged per output: per token for a language model (here the
    mean cross-entropy over every token of the check windows, from a direct model call)."""
    if not (SHARED_DATA / "shakespeare").is_dir():
        pytest.skip(f"Shakespeare is not in {SHARED_DATA}")
    cfg = load_config(None, [
        "rule=dfa", "model.name=transformer", "model.d_model=16", "model.layers=1",
        "model.heads=2", "data.name=shakespeare", f"data.root={SHARED_DATA}", "data.seq_len=16",
        "data.train_subset=64", "data.test_subset=16", "data.batch_size=16",
        "train.progress=false", "train.threads=1", "calibration.every_epochs=1",
        "calibration.batch_size=16", "calibration.line_search=1", "calibration.check_rows=32"])
    trainer = Trainer(cfg, None)
    batch = random_batch_indices(len(trainer.train.y), 16, cfg.seed, 1)
    x, y = trainer.data.plain_rows(trainer.data.check_indices(batch, 1, 32))
    assert y.shape == (32, 16)
    trainer.model.eval()
    with torch.no_grad():
        logits = trainer.model(x)
        want = float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)))
    trainer.model.train()
    trainer.calibrate(1)
    assert trainer.state.calibrations[-1].loss_before == pytest.approx(want, rel=1e-5)
