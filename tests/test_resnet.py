"""CIFAR ResNets as blocks: closed-form tangents (BatchNorm with the batch's statistics held,
residual adds, option-A shortcuts, global pooling) against torch.func.jvp, the trajectory
whatever the stage split, evaluation in eval mode, and an alignment probe that leaves the model
as it found it."""

from __future__ import annotations

import pytest
import torch
from helpers import freeze_batch_statistics
from torch import nn
from torch.func import jvp

from grape_dist.build import build_engine
from grape_dist.config import load_config
from grape_dist.metrics.alignment import probe_alignment
from grape_dist.models import build_resnet
from grape_dist.rules.tangents import block_forward
from grape_dist.runtime import Layout


def resnet(depth=8, classes=5):
    return build_resnet((3, 8, 8), classes, depth).materialize(seed=0)


@pytest.mark.parametrize("streams", [1, 3])
def test_block_tangents_match_torch_func_jvp_with_batch_statistics_held(streams):
    torch.manual_seed(0)
    m = resnet().double()
    h = torch.randn(6, 3, 8, 8, dtype=torch.double)
    rows = torch.tensor([1, 4])
    for block in m.blocks:
        t = torch.randn(streams, len(rows), *h.shape[1:], dtype=torch.double)
        y, tt = block_forward(block, h, t, rows)
        ref_block = __import__("copy").deepcopy(block)
        freeze_batch_statistics(ref_block, h)
        torch.testing.assert_close(y, ref_block(h))  # held statistics: the same primal
        for k in range(streams):
            _, ref = jvp(ref_block, (h[rows],), (t[k],))
            torch.testing.assert_close(tt[k], ref, rtol=1e-9, atol=1e-11)
        h = y.detach()


def test_depths_and_shapes():
    m = build_resnet((3, 32, 32), 100, 56)
    assert len(m.blocks) == 29  # stem, 27 residual blocks, head
    assert m.blocks[1].out_shape == (16, 32, 32) and m.blocks[-2].out_shape == (64, 8, 8)
    with pytest.raises(ValueError, match="6n \\+ 2"):
        build_resnet((3, 32, 32), 10, 21)


@pytest.mark.parametrize("rule,extra", [
    ("bp", []), ("dfa", []), ("grape", ["grape.tangent_samples=3"]),
    ("dfa", ["feedback.points=layer"]),
    ("grape", ["grape.tangent_samples=3", "feedback.points=layer", "feedback.conv=channel"])])
def test_stage_splits_with_the_same_micro_batches_follow_one_trajectory(rule, extra):
    """BatchNorm normalises each micro-batch by its own statistics, so a split over stages
    changes nothing as long as the micro-batches are the same."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 5, (8,), generator=g)

    def run(stages, bounds):
        cfg = load_config(None, [f"rule={rule}", *extra, "optim.name=sgd", "optim.lr=0.1",
                                 "optim.momentum=0.9", "pipeline.micro_batches=2"])
        m = build_resnet((3, 8, 8), 5, 8)
        engine = build_engine(cfg, m, Layout.in_process(stages), torch.device("cpu"), bounds)
        losses = [engine.train_step(x, y, s).loss_sum for s in range(3)]
        return losses, m.state_dict()

    one = run(1, None)
    split = run(3, [(0, 2), (2, 4), (4, 5)])
    assert split[0] == pytest.approx(one[0], rel=1e-5)
    for k, v in one[1].items():
        torch.testing.assert_close(split[1][k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_evaluation_uses_running_statistics_and_the_probe_changes_nothing():
    cfg = load_config(None, ["rule=grape"])
    m = build_resnet((3, 8, 8), 5, 8)
    engine = build_engine(cfg, m, Layout.in_process(2), torch.device("cpu"))
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 5, (8,))
    engine.train_step(x, y, 0)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    loss, _ = engine.evaluate(x, y, 4)
    m.eval()
    with torch.no_grad():
        ref = nn.functional.cross_entropy(m(x), y, reduction="sum")
    m.train()
    assert loss == pytest.approx(float(ref), rel=1e-5)
    align = probe_alignment(engine, x, y, seed=1, max_outputs=10)
    assert set(align) == {b.name for b in list(m.blocks)[:-1]}
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, before[k], msg=k)  # running statistics included
    assert all(b.training for b in m.blocks)
