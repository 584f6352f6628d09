"""The stage runtime in one process: any split into stages and micro-batches gives the same
trajectory as one stage (the property the multi-rank pipeline must keep)."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import tiny_cnn

from grape_dist.config import load_config
from grape_dist.runtime import LocalPipeline, build_stages, split_micro_batches

SPLITS = {1: [(0, 3)], 2: [(0, 1), (1, 3)], 3: [(0, 1), (1, 2), (2, 3)]}


def _run(rule, bounds, micro, extra=(), steps=3):
    cfg = load_config(None, [f"rule={rule}", "optim.lr=0.01", "grape.tangent_samples=0",
                             f"pipeline.micro_batches={micro}", *extra])
    model = copy.deepcopy(tiny_cnn())
    stages = build_stages(cfg, model, bounds)
    pipe = LocalPipeline(stages, micro)
    g = torch.Generator().manual_seed(5)
    losses = []
    for step in range(steps):
        x = torch.randn(12, 2, 8, 8, generator=g)
        y = torch.randint(0, 3, (12,), generator=g)
        losses.append(pipe.train_step(x, y, step).loss_sum)
        if stages[0].calibration is not None and step == 1:
            pipe.calibrate(x, y, step)
    fb = {}
    for s in stages:
        fb.update(s.rule.feedback_matrices())
    return losses, {k: v.detach() for k, v in model.state_dict().items()}, fb


@pytest.mark.parametrize("rule,extra", [
    ("bp", ()), ("fa", ()), ("dfa", ("calibration.every_epochs=1",)), ("drtp", ()),
    ("grape", ("calibration.every_epochs=1",)),
    ("grape", ("grape.routing=shared",)),
])
def test_stage_splits_and_micro_batches_follow_one_trajectory(rule, extra):
    ref_losses, ref_w, ref_b = _run(rule, SPLITS[1], 1, extra)
    for p, micro in ((2, 1), (3, 1), (1, 3), (3, 4)):
        losses, w, b = _run(rule, SPLITS[p], micro, extra)
        torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
        for k in ref_w:
            torch.testing.assert_close(w[k], ref_w[k], rtol=1e-5, atol=1e-6)
        for k in ref_b:
            torch.testing.assert_close(b[k], ref_b[k], rtol=1e-5, atol=1e-6)


def test_weights_move_and_calibration_changes_the_trajectory():
    _, w0, _ = _run("grape", SPLITS[1], 1)
    _, w1, _ = _run("grape", SPLITS[1], 1, ("calibration.every_epochs=1",))
    init = tiny_cnn().state_dict()
    assert any(not torch.allclose(w0[k], init[k]) for k in init)
    assert any(not torch.allclose(w0[k], w1[k]) for k in init)


def test_split_micro_batches():
    assert split_micro_batches(10, 3) == [(0, 4), (4, 3), (7, 3)]
    assert split_micro_batches(2, 4) == [(0, 1), (1, 1)]


def test_bad_stage_bounds_are_refused():
    cfg = load_config(None, ["rule=dfa"])
    with pytest.raises(ValueError, match="do not tile"):
        build_stages(cfg, tiny_cnn(), [(0, 2)])
