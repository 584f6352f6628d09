"""The calibration step's forms against independent computations, and its safety on a model
trained by a direct rule (issue 17): the paper's single SGD step can raise the training loss of
such a model several-fold; the shipped default must not."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

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
    loss = F.cross_entropy(trainer.model(trainer.train.x[idx]), trainer.train.y[idx])
    return list(torch.autograd.grad(loss, list(trainer.model.parameters())))


def test_bounded_paper_step_is_the_sgd_step_scaled_into_the_trust_region():
    """max_update = r: each tensor moves along -g by min(lr |g|, r |W|)."""
    lr, r = 0.5, 0.02
    cfg = load_config(None, [*SMALL, "calibration.form=paper", f"calibration.optim.lr={lr}",
                             f"calibration.max_update={r}"])
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
                             "optim.name=adam",
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


def _loss_after_calibration(trained_dfa, *overrides: str) -> float:
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
                                   "calibration.max_update=0") > 1.5 * loss0


def test_default_calibration_does_not_raise_the_training_loss(trained_dfa):
    loss0 = trained_dfa[3]
    assert _loss_after_calibration(trained_dfa) < 1.05 * loss0
