"""The transport between ranks on real gloo process groups (two processes, torch.multiprocessing):
shapes travel once per message key (no header after a key's first message, on raw messages and
through the engine's schedules, evaluation and alignment probe), shapes that vary (smaller
micro-batches, absent tangents) work, the in-flight cap holds, and a disagreement between the
ranks fails loudly instead of hanging or corrupting."""

from __future__ import annotations

import datetime
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from grape_dist.runtime.layout import Layout
from grape_dist.runtime.transport import InProcessTransport, MessageMismatch, message_key

CPU = torch.device("cpu")
LAYOUT = Layout(2, 2, 1, 2)  # two ranks, one stage each


def _spawn(fn, tmp_path, *args) -> None:
    """Run fn(rank, *args) on two gloo ranks; a failure on either fails the test."""
    mp.spawn(_entry, args=(fn, str(tmp_path / "store"), args), nprocs=2, join=True)


def _entry(rank: int, fn, store_path: str, args) -> None:
    torch.set_num_threads(1)
    store = dist.FileStore(store_path, 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        fn(rank, *args)
        dist.barrier()
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def _transport(cap: int = 4):
    from grape_dist.distributed.mesh import Mesh
    from grape_dist.distributed.transport import DistributedTransport

    return DistributedTransport(Mesh.create(LAYOUT), LAYOUT, CPU, cap)


def _bundle(size: int, m: int, seq: int) -> list[torch.Tensor | None]:
    """An activation (size x 5) and, for m > 0, tangents (2 x m x 5), filled from `seq`."""
    g = torch.Generator().manual_seed(seq)
    return [torch.randn(size, 5, generator=g),
            torch.randn(2, m, 5, generator=g) if m else None]


# Mini-batches of micro-batch sizes (and tangent rows): a last smaller micro-batch, one without
# tangent rows, a smaller last mini-batch; then the same again.
EPOCH = [[(4, 2), (4, 1), (3, 0)], [(4, 2), (4, 1), (3, 0)], [(2, 1), (1, 0)]]


def _messages(epochs: int):
    seq = 0
    for _ in range(epochs):
        for mbs in EPOCH:
            start = 0
            for size, m in mbs:
                yield seq, message_key("fwd", start, size), size, m
                start += size
                seq += 1


def _shapes_worker(rank: int) -> None:
    t = _transport()
    keys = {key for _, key, _, _ in _messages(1)}
    for epoch in (1, 2):
        for seq, key, size, m in _messages(1):
            seq += 1000 * epoch
            if rank == 0:
                t.send(_bundle(size, m, seq), 0, 1, key)
                # BP's gradient back, once per micro-batch.
                (g,) = t.recv(1, 0, message_key("grad", key))
                assert torch.equal(g, torch.full((size, 5), float(seq)))
            else:
                h, tan = t.recv(0, 1, key)
                ref = _bundle(size, m, seq)
                assert torch.equal(h, ref[0])
                assert tan is None if m == 0 else torch.equal(tan, ref[1])
                t.send([torch.full((size, 5), float(seq))], 1, 0, message_key("grad", key))
        t.flush()
        c = t.counters()
        n = len(EPOCH[0]) + len(EPOCH[1]) + len(EPOCH[2])
        assert c["messages_sent"] == c["messages_received"] == epoch * n
        # A header per key and direction, the first time only.
        assert c["headers_sent"] == c["headers_received"] == len(keys), c
    t.check_idle("end")


def test_shapes_travel_once_per_key_and_may_vary_with_it(tmp_path):
    _spawn(_shapes_worker, tmp_path)


def _cap_worker(rank: int, cap: int) -> None:
    t = _transport(cap)
    key = message_key("fwd", 0, 3)
    if rank == 0:
        peaks = []
        for i in range(10):
            t.send([torch.full((3, 5), float(i))], 0, 1, key)
            peaks.append(t.in_flight()["sends"])
        t.flush()
        assert max(peaks) <= cap and t.peak_sends_in_flight <= cap, (peaks, cap)
        assert max(peaks) == cap  # it got there: the receiver was late
        assert t.in_flight()["sends"] == 0
    else:
        time.sleep(1.0)  # let the sender run ahead until the cap stops it
        for i in range(10):
            (h,) = t.recv(0, 1, key)
            assert torch.equal(h, torch.full((3, 5), float(i)))


@pytest.mark.parametrize("cap", [1, 3])
def test_sends_in_flight_stay_under_the_cap(cap, tmp_path):
    _spawn(_cap_worker, tmp_path, cap)


def _mismatch_worker(rank: int) -> None:
    t = _transport()
    a, b = message_key("fwd", 0, 3), message_key("fwd", 3, 3)
    x = [torch.ones(3, 5), None]
    # Both keys agreed, same shapes.
    for key in (a, b):
        if rank == 0:
            t.send(x, 0, 1, key)
        else:
            t.recv(0, 1, key)
    t.flush()
    # 1. The sender's shapes differ from the ones agreed for the key: refused before sending.
    if rank == 0:
        with pytest.raises(MessageMismatch, match="agreed for this key"):
            t.send([torch.ones(4, 5), None], 0, 1, a)
    # 2. The receiver expects another (already agreed) key of the same shapes: the tag says so.
    if rank == 0:
        t.send(x, 0, 1, a)
        t.flush()
    else:
        with pytest.raises(MessageMismatch, match="expected a tag for key"):
            t.recv(0, 1, b)
    # 3. The sender starts a new key the receiver thinks it knows: a header arrives for a tag.
    c = message_key("fwd", 6, 3)
    if rank == 0:
        t.send(x, 0, 1, c)
        t.flush()
    else:
        with pytest.raises(MessageMismatch, match="got a header"):
            t.recv(0, 1, a)
    # 4. The receiver expects a new key the sender has not sent: the header names another.
    if rank == 0:
        t.send(x, 0, 1, message_key("fwd", 9, 3))
        t.flush()
    else:
        with pytest.raises(MessageMismatch, match="expected the header of key"):
            t.recv(0, 1, message_key("fwd", 12, 3))
        dist.recv(torch.empty(3, 5), 0)  # drain the data that followed the header


def test_a_disagreement_between_the_ranks_fails_loudly(tmp_path):
    _spawn(_mismatch_worker, tmp_path)


def test_in_process_messages_check_their_keys():
    t = InProcessTransport()
    t.send([torch.zeros(1)], 0, 1, message_key("fwd", 0, 1))
    with pytest.raises(MessageMismatch, match="mixes messages up"):
        t.recv(0, 1, message_key("fwd", 1, 1))


def _engine_worker(rank: int, rule: str) -> None:
    from helpers import tiny_cnn

    from grape_dist.build import build_engine
    from grape_dist.config import load_config
    from grape_dist.metrics.alignment import probe_alignment
    from grape_dist.runtime import plan_layout

    calibrate = ["calibration.every_epochs=1"] if rule != "bp" else []
    cfg = load_config(None, [f"rule={rule}", "optim.lr=0.01", "pipeline.micro_batches=3",
                             "grape.tangent_samples=4", *calibrate])
    model = tiny_cnn()
    engine = build_engine(cfg, model, plan_layout(cfg, len(model.blocks), 2), CPU)
    g = torch.Generator().manual_seed(0)  # the same data on both ranks

    def data(n):
        return torch.randn(n, 2, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)

    def epoch(step):
        for n in (12, 12, 7):  # a smaller last mini-batch: micro-batches of 3, 2, 2 rows
            engine.train_step(*data(n), step)
            step += 1
        if engine.calibration_schedule is not None:
            engine.calibrate(*data(12), step)
        engine.evaluate(*data(10), batch_size=4)  # chunks of 4, 4, 2 rows
        if rule != "bp":
            probe_alignment(engine, *data(6), seed=1, max_outputs=3)
        return dict(engine.transport.counters())

    first, second = epoch(0), epoch(10)
    assert second["messages_sent"] + second["messages_received"] > \
        first["messages_sent"] + first["messages_received"]
    # Every shape was agreed in the first epoch: no header afterwards.
    assert (second["headers_sent"], second["headers_received"]) == \
        (first["headers_sent"], first["headers_received"]), (first, second)
    assert first["headers_sent"] + first["headers_received"] > 0


@pytest.mark.parametrize("rule", ["grape", "bp"])
def test_the_engine_agrees_every_shape_in_its_first_epoch(rule, tmp_path):
    _spawn(_engine_worker, tmp_path, rule)
