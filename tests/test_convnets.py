"""The CIFAR AlexNet and VGG-16 of Table 2 as blocks, and keyed dropout: block tangents against
torch.func.jvp (dropout mask fixed, BatchNorm statistics held), block counts and shapes, masks
that depend on (seed, step, block, global row) and not on the micro-batch split, and one step of
each rule on each model."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import freeze_batch_statistics
from torch import nn
from torch.func import jvp

from grape_dist.build import build_engine
from grape_dist.config import load_config
from grape_dist.metrics.alignment import probe_alignment
from grape_dist.models import (
    Block,
    BlockModel,
    KeyedDropout,
    build_alexnet,
    build_vgg16,
    dropout_rows,
)
from grape_dist.models.dropout import assign_dropout_keys, current_rows
from grape_dist.rules.tangents import block_forward
from grape_dist.runtime import Layout
from grape_dist.trainer import build_model_for

TINY = {"alexnet": (build_alexnet, 1 / 16), "vgg16": (build_vgg16, 1 / 16)}


def tiny(name: str, classes: int = 5, dropout: float = 0.5):
    build, width = TINY[name]
    return build((3, 32, 32), classes, width, dropout)


# -- the models ---------------------------------------------------------------------------------


def test_alexnet_has_eight_blocks_and_vgg16_sixteen_with_the_cifar_shapes():
    alex = build_alexnet((3, 32, 32), 100)  # meta: no memory
    assert [b.name for b in alex.blocks] == ["conv1", "conv2", "conv3", "conv4", "conv5",
                                             "fc1", "fc2", "head"]
    assert [b.out_shape for b in alex.blocks] == [
        (64, 15, 15), (192, 7, 7), (384, 7, 7), (256, 7, 7), (256, 3, 3), (4096,), (4096,),
        (100,)]
    vgg = build_vgg16((3, 32, 32), 100)
    assert len(vgg.blocks) == 16 and vgg.blocks[-1].name == "head"
    assert [b.out_shape[0] for b in vgg.blocks[:13]] == \
        [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    # Pools after conv 2, 4, 7, 10, 13: 32 -> 1.
    assert [b.out_shape[1] for b in vgg.blocks[:13]] == [32, 16, 16, 8, 8, 8, 4, 4, 4, 2, 2, 2, 1]
    assert [b.out_shape for b in vgg.blocks[13:]] == [(512,), (512,), (100,)]
    kinds = [[type(x).__name__ for x in b] for b in vgg.blocks]
    assert kinds[0] == ["Conv2d", "BatchNorm2d", "ReLU"] and vgg.blocks[0][0].bias is None
    assert kinds[1] == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"]
    assert kinds[13:] == [["Flatten", "KeyedDropout", "Linear", "ReLU"],
                          ["KeyedDropout", "Linear", "ReLU"], ["Linear"]]
    # A dropout at the input of each hidden Linear, none elsewhere; width scales every layer.
    for m in (alex, vgg):
        drops = [b.name for b in m.blocks for x in b if isinstance(x, KeyedDropout)]
        assert drops == ["fc1", "fc2"]
    small = build_alexnet((3, 32, 32), 10, width=0.25, dropout=0.0)
    assert [b.out_shape[0] for b in small.blocks] == [16, 48, 96, 64, 64, 1024, 1024, 10]
    assert not any(isinstance(x, KeyedDropout) for b in small.blocks for x in b)
    with pytest.raises(ValueError, match="32x32"):
        build_vgg16((1, 28, 28), 10)


def test_model_config_builds_both_and_validates_width_and_dropout():
    cfg = load_config(None, ["model.name=vgg16", "data.name=cifar100", "model.width=0.5",
                             "model.dropout=0.3"])
    m = build_model_for(cfg)
    assert len(m.blocks) == 16 and m.blocks[0].out_shape == (32, 32, 32)
    assert m.blocks[13][1].p == 0.3
    assert len(build_model_for(load_config(None, ["model.name=alexnet",
                                                  "data.name=cifar10"])).blocks) == 8
    for bad, match in (("model.dropout=1.0", "model.dropout"), ("model.width=0", "model.width"),
                       ("data.name=mnist", "vgg16")):
        with pytest.raises(ValueError, match=match):
            load_config(None, ["model.name=vgg16", "data.name=cifar10", bad])


@pytest.mark.parametrize("name", ["alexnet", "vgg16"])
@pytest.mark.parametrize("streams", [1, 2])
def test_block_tangents_match_torch_func_jvp_with_mask_and_statistics_held(name, streams,
                                                                          float64):
    """Each block's fused tangent (conv, ReLU, max pool, BatchNorm at the batch's statistics,
    Flatten, keyed dropout, Linear) on tangent rows `rows` against torch.func.jvp of the same
    function: BatchNorm in eval mode at exactly those statistics, the dropout mask the one of
    the rows' context (micro-batch rows 3..8 of a mini-batch of 11)."""
    torch.manual_seed(0)
    m = tiny(name).materialize(seed=0).double()
    n = 6
    h = torch.randn(n, 3, 32, 32)
    rows = torch.tensor([1, 4, 5])
    seen_dropout = False
    with dropout_rows(step=7, start=3, size=n, total=11):
        for block in m.blocks:
            t = torch.randn(streams, len(rows), *h.shape[1:])
            y, tt = block_forward(block, h, t, rows)
            ref = copy.deepcopy(block)
            freeze_batch_statistics(ref, h)
            torch.testing.assert_close(y, ref(h))  # the same mask and statistics: same primal
            for k in range(streams):
                # Per-row function: the JVP on all rows, tangent zero off `rows`.
                t_all = torch.zeros(n, *h.shape[1:])
                t_all[rows] = t[k]
                _, ref_t = jvp(ref, (h,), (t_all,))
                torch.testing.assert_close(tt[k], ref_t[rows], rtol=1e-9, atol=1e-11)
            seen_dropout |= any(isinstance(x, KeyedDropout) for x in block)
            h = y.detach()
    assert seen_dropout


# -- keyed dropout --------------------------------------------------------------------------


def keyed(p: float = 0.5, seed: int = 0, block: int = 3, position: int = 0) -> KeyedDropout:
    d = KeyedDropout(p)
    d.key = (seed, block, position)
    return d


def test_dropout_mask_is_the_same_whatever_the_micro_batch_split():
    """Total 8 rows: one micro-batch of 8, 3 + 5 (fresh modules: no shared cache) and a
    data-parallel-like 5 + 3 give the same mask on every global row."""
    x = torch.randn(8, 4, 3, 3) + 3.0  # no zero entries: the mask is visible in the output
    with dropout_rows(5, 0, 8, 8):
        whole = keyed()(x)
    parts = []
    for start, size in ((0, 3), (3, 5)):
        with dropout_rows(5, start, size, 8):
            parts.append(keyed()(x[start:start + size]))
    torch.testing.assert_close(torch.cat(parts), whole, rtol=0, atol=0)
    d = keyed()
    with dropout_rows(5, 5, 3, 8):
        tail = d(x[5:])
    with dropout_rows(5, 0, 5, 8):
        head = d(x[:5])
    torch.testing.assert_close(torch.cat([head, tail]), whole, rtol=0, atol=0)


def test_dropout_mask_is_keyed_by_step_block_position_seed_and_stream():
    x = torch.ones(8, 64)

    def out(d: KeyedDropout, step: int = 5, stream: str = "train") -> torch.Tensor:
        with dropout_rows(step, 0, 8, 8, stream):
            return d(x)

    ref = out(keyed())
    torch.testing.assert_close(out(keyed()), ref, rtol=0, atol=0)
    for other in (out(keyed(), step=6), out(keyed(block=4)), out(keyed(position=1)),
                  out(keyed(seed=1)), out(keyed(), stream="calibration")):
        assert not torch.equal(other, ref)


def test_dropout_scales_by_one_over_keep_and_is_the_identity_in_eval():
    x = torch.randn(64, 256) + 5.0
    d = keyed(p=0.25)
    with dropout_rows(0, 0, 64, 64):
        y = d(x)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.75)
    assert abs(1 - kept.double().mean().item() - 0.25) < 0.01  # 16k draws
    d.eval()
    with dropout_rows(0, 0, 64, 64):
        assert torch.equal(d(x), x)
    assert torch.equal(keyed(p=0.0)(x), x)
    # Outside any context: plain dropout on the global stream (fresh masks, same scaling).
    d.train()
    a, b = d(x), d(x)
    assert not torch.equal(a, b) and current_rows() is None
    torch.testing.assert_close(a[a != 0], x[a != 0] / 0.75)


def test_dropout_needs_a_key_in_a_context_and_materialize_gives_it():
    with dropout_rows(0, 0, 2, 2), pytest.raises(RuntimeError, match="materialize"):
        KeyedDropout(0.5)(torch.ones(2, 3))
    with dropout_rows(0, 0, 2, 2), pytest.raises(ValueError, match="3 rows"):
        keyed()(torch.ones(3, 3))
    m = build_alexnet((3, 32, 32), 10, width=1 / 16)
    m.materialize([6], seed=4)  # only fc2, as a rank holding that stage would
    assert m.blocks[6][0].key == (4, 6, 0)
    assert m.build_block(5, 4)[1].key == (4, 5, 0)
    block = copy.deepcopy(m.blocks[6])
    assign_dropout_keys(block, 9, 2)
    assert block[0].key == (9, 2, 0)
    # Blocks given already built are keyed when materialised too.
    built = BlockModel([Block("a", nn.Linear(3, 3)),
                        Block("b", KeyedDropout(0.5), nn.Linear(3, 3), KeyedDropout(0.1)),
                        Block("out", nn.Linear(3, 2))], (3,), 2)
    built.materialize(seed=5)
    assert (built.blocks[1][0].key, built.blocks[1][2].key) == ((5, 1, 0), (5, 1, 1))


# -- one step of each rule; the trajectory whatever the split -----------------------------------


def engine_for(name: str, rule: str, stages: int = 1, micro: int = 1, extra=(),
               bounds=None):
    cfg = load_config(None, [f"rule={rule}", f"model.name={name}", "data.name=cifar10",
                             "model.width=0.0625", "optim.name=sgd", "optim.lr=0.02",
                             "optim.momentum=0.9", f"pipeline.micro_batches={micro}", *extra])
    m = build_model_for(cfg)
    return build_engine(cfg, m, Layout.in_process(stages), torch.device("cpu"), bounds), m


def batch(n: int = 8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


@pytest.mark.parametrize("name", ["alexnet", "vgg16"])
@pytest.mark.parametrize("rule", ["bp", "dfa", "grape"])
def test_one_step_of_each_rule_trains_each_model(name, rule):
    cal = ["calibration.every_epochs=1", "calibration.batch_size=8"] if rule != "bp" else []
    engine, m = engine_for(name, rule, stages=2, micro=2, extra=cal)
    x, y = batch()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    r = engine.train_step(x, y, 0)
    assert torch.isfinite(torch.tensor(r.loss_sum)) and r.samples == 8
    moved = [k for k, v in m.state_dict().items() if "weight" in k and not torch.equal(
        v, before[k])]
    # Every block's weights moved (DFA/GrAPE: each block from its own projected signal).
    assert {k.split(".")[1] for k in moved} == {str(i) for i in range(len(m.blocks))}
    if rule != "bp":
        engine.calibrate(x, y, 1)
        align = probe_alignment(engine, x, y, seed=0, max_outputs=10)
        assert set(align) == {b.name for b in list(m.blocks)[:-1]}
        # The probe's dropout masks are fixed: measuring twice gives the same numbers.
        assert probe_alignment(engine, x, y, seed=0, max_outputs=10) == align
    loss, correct = engine.evaluate(x, y, 4)
    assert loss > 0 and 0 <= correct <= 8


@pytest.mark.parametrize("rule,extra", [
    ("bp", []), ("dfa", []), ("grape", ["grape.tangent_samples=5"]),
])
def test_alexnet_with_dropout_follows_one_trajectory_whatever_the_split(rule, extra):
    """No BatchNorm: neither the stage split nor the micro-batching changes the trajectory,
    dropout included (masks keyed by global row, not by micro-batch)."""
    x, y = batch(10)

    def run(stages, micro, bounds=None):
        engine, m = engine_for("alexnet", rule, stages, micro, extra, bounds)
        losses = [engine.train_step(x, y, s).loss_sum for s in range(3)]
        return losses, m.state_dict()

    one = run(1, 1)
    for stages, micro, bounds in ((1, 3, None), (3, 4, [(0, 3), (3, 6), (6, 8)])):
        other = run(stages, micro, bounds)
        assert other[0] == pytest.approx(one[0], rel=1e-5)
        for k, v in one[1].items():
            torch.testing.assert_close(other[1][k], v, rtol=1e-4, atol=1e-5, msg=k)
    # Dropout is on (a run without it differs) and the same run repeats exactly.
    assert run(1, 1)[0] == one[0]
    engine, _ = engine_for("alexnet", rule, 1, 1, [*extra, "model.dropout=0"])
    assert engine.train_step(x, y, 0).loss_sum != pytest.approx(one[0][0], rel=1e-6)
