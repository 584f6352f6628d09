"""The engine in one process: any split into in-process stages and any micro-batching follow
one trajectory (the property the multi-rank pipeline must keep); nothing is left in flight;
blocks are initialised per block; the alignment probe equals a full-model backward."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import tiny_cnn, tiny_mlp

from grape_dist.build import build_engine
from grape_dist.config import load_config
from grape_dist.metrics.alignment import probe_alignment
from grape_dist.rng import keyed_generator
from grape_dist.rules.feedback import frobenius_cosine, jacobian_estimate
from grape_dist.rules.tangents import block_forward
from grape_dist.runtime import Layout, LayoutError, plan_layout
from grape_dist.runtime.transport import InFlightError, MessageMismatch

CPU = torch.device("cpu")
SPLITS = {1: [(0, 3)], 2: [(0, 1), (1, 3)], 3: [(0, 1), (1, 2), (2, 3)]}


def _engine(rule, stages, micro, extra=(), model=None):
    cfg = load_config(None, [f"rule={rule}", "optim.lr=0.01", f"pipeline.micro_batches={micro}",
                             *extra])
    model = copy.deepcopy(model if model is not None else tiny_cnn())
    return build_engine(cfg, model, Layout.in_process(stages), CPU, SPLITS[stages])


def _run(rule, stages, micro, extra=(), steps=3, model=None):
    engine = _engine(rule, stages, micro, extra, model)
    g = torch.Generator().manual_seed(5)
    losses = []
    for step in range(steps):
        x = torch.randn(12, *engine.model.input_shape, generator=g)
        y = torch.randint(0, 3, (12,), generator=g)
        losses.append(engine.train_step(x, y, step).loss_sum)
        if engine.calibration_schedule is not None and step == 1:
            engine.calibrate(x, y, step)
    fb = {}
    for s in engine.stages:
        fb.update(s.rule.feedback_matrices())
    return losses, {k: v.detach() for k, v in engine.model.state_dict().items()}, fb


CASES = [
    ("bp", ()), ("fa", ()), ("dfa", ("calibration.every_epochs=1",)), ("drtp", ()),
    ("grape", ("calibration.every_epochs=1",)), ("grape", ("grape.routing=shared",)),
    # Tangents on 2 rows of each mini-batch: the rows are chosen by global row index, so the
    # micro-batching does not change them (it used to: B differed by 0.56 for M=1 vs M=3).
    ("grape", ("grape.tangent_samples=2",)),
    ("grape", ("grape.tangent_samples=5", "grape.routing=shared")),
    # K = 3 directions per tangent row.
    ("grape", ("grape.tangent_samples=3", "grape.directions=3")),
    ("dfa", ("pipeline.streaming=true",)), ("grape", ("pipeline.streaming=true",)),
    # Channel-shared conv feedback (tangents drawn per channel, repeated over positions).
    ("grape", ("feedback.conv=channel", "grape.tangent_samples=5")),
]


@pytest.mark.parametrize("rule,extra", CASES, ids=[f"{r}-{'-'.join(e) or 'default'}"
                                                   for r, e in CASES])
def test_stage_splits_and_micro_batches_follow_one_trajectory(rule, extra):
    ref_losses, ref_w, ref_b = _run(rule, 1, 1, extra)
    for p, micro in ((2, 1), (3, 1), (1, 3), (3, 4), (2, 5)):
        losses, w, b = _run(rule, p, micro, extra)
        torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-6)
        for k in ref_w:
            torch.testing.assert_close(w[k], ref_w[k], rtol=1e-5, atol=1e-6)
        for k in ref_b:
            torch.testing.assert_close(b[k], ref_b[k], rtol=1e-5, atol=1e-6)


@pytest.fixture
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def test_pepita_splits_follow_one_trajectory(float64):
    # float64: PEPITA sums micro-batch updates one by one, and Adam amplifies float32 rounding
    # of near-zero gradients.
    mlp = tiny_mlp(d_in=2 * 8 * 8).double()
    flat = torch.nn.Sequential(torch.nn.Flatten(), *mlp.blocks[0])
    mlp.blocks[0] = type(mlp.blocks[0])("fc1", *flat)
    mlp = type(mlp)(list(mlp.blocks), (2, 8, 8), 3)
    ref = _run("pepita", 1, 1, model=mlp)
    for p, micro in ((3, 1), (2, 4)):
        out = _run("pepita", p, micro, model=mlp)
        torch.testing.assert_close(out[0], ref[0], rtol=1e-5, atol=1e-6)
        for k in ref[1]:
            torch.testing.assert_close(out[1][k], ref[1][k], rtol=1e-5, atol=1e-6)


def test_weights_move_and_calibration_changes_the_trajectory():
    _, w0, _ = _run("grape", 1, 1)
    _, w1, _ = _run("grape", 1, 1, ("calibration.every_epochs=1",))
    init = tiny_cnn().state_dict()
    assert any(not torch.allclose(w0[k], init[k]) for k in init)
    assert any(not torch.allclose(w0[k], w1[k]) for k in init)


def test_a_stray_message_is_caught_at_the_end_of_the_mini_batch():
    engine = _engine("dfa", 2, 2)
    x, y = torch.randn(4, 2, 8, 8), torch.tensor([0, 1, 2, 0])
    engine.train_step(x, y, 0)
    # A well-formed message that no stage receives (DFA sends nothing back) is left over.
    engine.transport.send([torch.zeros(2, 3, 4, 4), None], 1, 0)
    with pytest.raises(InFlightError, match="in flight"):
        engine.train_step(x, y, 1)
    # An extra activation for stage 1 shifts its messages: the first key that differs says so.
    engine = _engine("dfa", 2, 2)
    engine.transport.send([torch.zeros(2, 3, 4, 4), None], 0, 1)
    with pytest.raises(MessageMismatch, match="mixes messages up"):
        engine.train_step(x, y, 1)


def test_blocks_are_initialised_from_a_per_block_key():
    """Any subset of blocks materialised anywhere gets the same weights; the others stay on
    the meta device and hold no memory."""
    from grape_dist.trainer import build_model_for
    cfg = load_config(None, ["model.name=lenet", "model.hidden=[32, 16]"])
    full = build_model_for(cfg).materialize(seed=7)
    a = build_model_for(cfg).materialize([0, 2], seed=7)
    b = build_model_for(cfg).materialize([4, 1, 3], seed=7)
    assert [a.is_materialized(i) for i in range(5)] == [True, False, True, False, False]
    assert all(p.is_meta for p in a.blocks[1].parameters())
    for part, held in ((a, (0, 2)), (b, (1, 3, 4))):
        for i in held:
            for p, q in zip(part.blocks[i].parameters(), full.blocks[i].parameters()):
                assert torch.equal(p, q)
    other_seed = build_model_for(cfg).materialize([0], seed=8)
    assert not torch.equal(other_seed.blocks[0][0].weight, full.blocks[0][0].weight)


def _reference_alignment(model, feedback, x, y, seed):
    """The metrics by a plain full-model backward (and one JVP per block through the rest of
    the model), with no pipeline. A channel-shared B (C columns for a C x H x W output) is
    compared through the matrix P (CHW x C) that repeats a channel's value over its
    positions: signal P B^T e, Jacobians J P."""
    blocks = list(model.blocks)
    hs, h = [], x
    for block in blocks:
        h = block(h)
        h.retain_grad()
        hs.append(h)
    loss = F.cross_entropy(h, y)
    ids = sorted(feedback)
    jac = {}
    for i in ids:
        rows = [torch.autograd.grad(h[:, c].sum(), hs[i], retain_graph=True)[0]
                .reshape(len(y), -1).sum(0) for c in range(h.shape[1])]
        jac[i] = torch.stack(rows)
    grads = torch.autograd.grad(loss, [hs[i] for i in ids])
    e = (F.softmax(h, 1) - F.one_hot(y, h.shape[1]).to(h.dtype)).detach() / len(y)
    out = {}
    for i, g in zip(ids, grads):
        b = feedback[i]
        g = g.reshape(len(y), -1)
        channels = hs[i].shape[1]
        pm = torch.eye(g.shape[1])
        if b.shape[1] != g.shape[1]:
            pm = torch.eye(channels).repeat_interleave(g.shape[1] // channels, dim=0)
        p = torch.randn(hs[i].shape, generator=keyed_generator(seed, "probe", i))
        t, hh = p.unsqueeze(0), hs[i].detach()
        with torch.no_grad():
            for block in blocks[i + 1:]:
                hh, t = block_forward(block, hh, t)
        out[blocks[i].name] = {
            "grad_cos": float(F.cosine_similarity(e @ b @ pm.T, g, dim=1, eps=1e-12).mean()),
            "jac_cos": frobenius_cosine(b, jac[i] @ pm),
            "jhat_cos": frobenius_cosine(b, jacobian_estimate(t[0], p) @ pm),
        }
    return out


@pytest.mark.parametrize("stages,conv", [(1, "full"), (2, "full"), (3, "full"),
                                         (2, "channel")])
def test_alignment_probe_matches_a_full_model_backward(stages, conv, float64):
    engine = _engine("grape", stages, 1, (f"feedback.conv={conv}",), model=tiny_cnn().double())
    x, y = torch.randn(6, 2, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    engine.train_step(x, y, 0)  # B moves away from its initial value
    got = probe_alignment(engine, x, y, seed=3, max_outputs=10)
    fb = {i: b for s in engine.stages for i, b in s.rule.feedback_matrices().items()}
    ref = _reference_alignment(engine.model, fb, x, y, seed=3)
    assert set(got) == set(ref) == {"conv1", "conv2"}
    for name in ref:
        for k, v in ref[name].items():
            assert got[name][k] == pytest.approx(v, rel=1e-9, abs=1e-12), (name, k)
    capped = probe_alignment(engine, x, y, seed=3, max_outputs=2)
    assert "jac_cos" not in capped["conv1"]
    assert capped["conv1"]["grad_cos"] == pytest.approx(got["conv1"]["grad_cos"])


def test_no_alignment_for_rules_without_feedback():
    assert probe_alignment(_engine("bp", 2, 1), torch.randn(2, 2, 8, 8), torch.tensor([0, 1]),
                                         0, 10) == {}


@pytest.mark.parametrize("world,overrides,match", [
    (3, ["model.hidden=[32]"], "pipeline.pp=3 stages but the model has only 2 blocks"),
    (3, ["pipeline.dp=2"], "WORLD_SIZE=3 is not a multiple of pipeline.dp=2"),
    (2, ["pipeline.pp=3"], r"pipeline.pp=3 x pipeline.dp=1 = 3 ranks, but WORLD_SIZE=2"),
    (1, ["pipeline.dp=2"], "WORLD_SIZE=1 is not a multiple of pipeline.dp=2"),
    (2, ["pipeline.stage_blocks=[2,1]", "model.hidden=[8,8,8]"],
     "must be positive block counts summing to the model's 4 blocks"),
    (2, ["rule=bp", "pipeline.schedule=1f1b", "data.drop_last=true", "pipeline.micro_batches=1"],
     "pipeline.schedule=1f1b needs pipeline.micro_batches >= pp = 2"),
    (2, ["rule=bp", "pipeline.schedule=dualpipev", "data.drop_last=true",
         "pipeline.micro_batches=2", "model.hidden=[8,8,8]"],
     "dualpipev needs pipeline.micro_batches >= 2 x pp = 4"),
    (2, ["rule=bp", "pipeline.schedule=zbv", "data.drop_last=true", "model.hidden=[8,8]"],
     "zbv needs 2 x pp = 4 stages but the model has only 3 blocks"),
    (2, ["rule=bp", "pipeline.schedule=gpipe", "data.drop_last=true", "pipeline.micro_batches=3"],
     "data.batch_size=128 is not divisible by pipeline.micro_batches=3"),
    (1, ["rule=bp", "pipeline.schedule=gpipe", "data.drop_last=true"],
     "on one process use pipeline.schedule=native"),
])
def test_layout_errors_name_the_keys(world, overrides, match):
    from grape_dist.trainer import build_model_for
    cfg = load_config(None, ["rule=dfa", *overrides])
    with pytest.raises(LayoutError, match=match):
        plan_layout(cfg, len(build_model_for(cfg).blocks), world)


def test_streaming_is_refused_on_nccl_until_run_on_gpus():
    cfg = load_config(None, ["rule=grape", "pipeline.streaming=true"])
    assert plan_layout(cfg, 3, 2, "gloo").pp == 2
    assert plan_layout(cfg, 3, 1, "nccl").pp == 1  # one stage: no pipeline to deadlock
    with pytest.raises(LayoutError, match="pipeline.streaming.*NCCL"):
        plan_layout(cfg, 3, 2, "nccl")


def test_layout_placements():
    loop = Layout(4, 2, 2, 4, "loop")
    vee = Layout(2, 2, 1, 4, "v")
    assert [loop.stages_at(p) for p in range(2)] == [[0, 2], [1, 3]]
    assert [vee.stages_at(p) for p in range(2)] == [[0, 3], [1, 2]]
    assert (loop.rank_of(1, 1), loop.position(3), loop.replica(3)) == (3, 1, 1)


def test_stage_streams_in_one_process_give_one_stage_per_block():
    """pipeline.stage_streams: one process splits the model into one stage per block (or per
    stage_blocks entry); without CUDA the stages run one after another, the same trajectory."""
    cfg = load_config(None, ["rule=grape", "pipeline.stage_streams=true"])
    assert plan_layout(cfg, 4, 1).num_stages == 4
    cfg2 = load_config(None, ["rule=grape", "pipeline.stage_streams=true",
                              "pipeline.stage_blocks=[1,3]"])
    assert plan_layout(cfg2, 4, 1).num_stages == 2
    x = torch.randn(12, 5, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 3, (12,), generator=torch.Generator().manual_seed(1))
    runs = []
    for streams in ("false", "true"):
        c = load_config(None, ["rule=grape", f"pipeline.stage_streams={streams}",
                               "optim.name=sgd", "optim.lr=0.5"])
        model = tiny_mlp()
        layout = plan_layout(c, len(model.blocks), 1)
        engine = build_engine(c, model, layout, torch.device("cpu"))
        runs.append(([engine.train_step(x, y, s).loss_sum for s in range(3)],
                     torch.cat([p.detach().flatten() for p in model.parameters()])))
    assert runs[1][0] == pytest.approx(runs[0][0], rel=1e-6)
    torch.testing.assert_close(runs[1][1], runs[0][1])


def test_statistics_can_stay_on_the_device_until_read():
    """read_stats=False (CUDA graph capture): the step returns its sums as 0-d tensors."""
    cfg = load_config(None, ["rule=grape"])
    engine = build_engine(cfg, tiny_mlp(), Layout.in_process(2), torch.device("cpu"))
    x, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 0, 1, 2])
    engine.train_schedule.read_stats = False
    lazy = engine.train_step(x, y, 0)
    assert isinstance(lazy.loss_sum, torch.Tensor) and lazy.loss_sum.dim() == 0
    assert all(isinstance(v, torch.Tensor) for v in lazy.stats.values())


def test_balance_by_time_measures_token_models_and_leaves_batch_norm_alone():
    """pipeline.balance=time: the language model's stage-0 input is token ids (float zeros
    would fail the embedding), and measuring a ResNet whose blocks are built changes none of
    their BatchNorm running statistics."""
    from grape_dist.runtime.partition import measured_costs
    from grape_dist.trainer import build_model_for

    lm = build_model_for(load_config(None, [
        "model.name=transformer", "data.name=shakespeare", "model.layers=2", "model.d_model=32",
        "model.heads=2", "data.seq_len=16"]))
    costs = measured_costs(lm, seed=0, batch=4, repeats=1)
    assert len(costs) == len(lm.blocks) and all(c > 0 for c in costs)
    resnet = build_model_for(load_config(None, ["model.name=resnet", "model.depth=8",
                                                "data.name=cifar10"]))
    resnet.materialize(range(len(resnet.blocks)), seed=0)
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    measured_costs(resnet, seed=0, batch=4, repeats=1)
    after = resnet.state_dict()
    assert any("running_mean" in k for k in before)
    assert all(torch.equal(before[k], after[k]) for k in before)


def _state_numbers(opt) -> int:
    """Numbers an optimiser keeps (moments, momentum buffers; not its step counters)."""
    if opt is None:
        return 0
    return sum(v.numel() for st in opt.state.values() for v in st.values()
               if torch.is_tensor(v) and v.dim() > 0)


@pytest.mark.parametrize("rule,extra", [
    ("grape", ["optim.name=adam", "calibration.every_epochs=1"]),  # B and its SGD momentum
    ("dfa", ["optim.name=sgd", "optim.momentum=0.9", "feedback.conv=channel"]),
    ("bp", ["optim.name=sgd", "optim.momentum=0"]),
])
def test_memory_balance_counts_what_each_stage_really_holds(rule, extra):
    """pipeline.balance=memory's costs per block (read from the meta model and the config)
    against what a stage of one block holds after a training step and a calibration: its
    weights, its optimisers' state, its feedback matrices and their optimiser's state."""
    from grape_dist.runtime.partition import held_costs

    cfg = load_config(None, [f"rule={rule}", *extra])
    model = tiny_cnn()
    want = held_costs(cfg, copy.deepcopy(model))
    n = len(model.blocks)
    engine = build_engine(cfg, model, Layout.in_process(n), CPU, [(i, i + 1) for i in range(n)])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, *engine.model.input_shape, generator=g)
    y = torch.randint(0, 3, (8,), generator=g)
    engine.train_step(x, y, 0)
    if engine.calibration_schedule is not None:
        engine.calibrate(x, y, 0)
    for stage in engine.stages:
        rule_ = stage.rule
        held = sum(p.numel() for p in rule_.parameters()) + _state_numbers(rule_.optimizer)
        held += sum(b.numel() for b in rule_.feedback_matrices().values())
        learner = getattr(rule_, "learner", None)
        held += _state_numbers(learner.optimizer if learner is not None else None)
        if stage.calibration is not None:
            held += _state_numbers(stage.calibration.optimizer)
        assert held == want[stage.index], (stage.index, held, want[stage.index])
    if rule != "bp":
        assert any(rule_.feedback_matrices() for rule_ in (s.rule for s in engine.stages))
