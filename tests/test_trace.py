"""Per-rank timelines (grape_dist/trace.py): valid Chrome/Perfetto JSON with the runtime's span
names in one process and on real gloo ranks, spans nested in their parents, nothing recorded or
written when tracing is off, and the report's timeline PNG."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from helpers import tiny_mlp
from training_runs import TORCHRUN, run

from grape_dist import report, trace
from grape_dist.build import build_engine
from grape_dist.config import load_config
from grape_dist.errors import UsageError
from grape_dist.runtime import Layout
from grape_dist.train import parse_args, trace_folder

CPU = torch.device("cpu")
EPS_US = 1.0  # ts/dur are floats in µs: allow rounding at the ends of a nested span
TRAIN = ["--quiet", "--config", "configs/mnist_mlp_grape.yaml", "data.train_subset=512",
         "data.test_subset=128", "model.hidden=[32,32]", "train.epochs=1", "train.threads=1",
         "data.batch_size=64", "pipeline.micro_batches=2", "calibration.every_epochs=0"]


@pytest.fixture(autouse=True)
def _no_tracer():
    trace.disable()
    yield
    trace.disable()


def _engine(stages: int = 2, *extra: str):
    cfg = load_config(None, ["rule=grape", "optim.lr=0.01", "pipeline.micro_batches=2",
                             "calibration.every_epochs=1", *extra])
    splits = {1: [(0, 3)], 2: [(0, 1), (1, 3)]}
    return build_engine(cfg, tiny_mlp(), Layout.in_process(stages), CPU, splits[stages])


def _batch(step: int):
    g = torch.Generator().manual_seed(step)
    return torch.randn(8, 5, generator=g), torch.randint(0, 3, (8,), generator=g)


def load(path: Path) -> tuple[list[dict], dict[tuple[int, int], str]]:
    """The complete events of a trace file (checked against Chrome's format) and the lane
    names by (pid, tid)."""
    doc = json.loads(path.read_text())
    assert doc["displayTimeUnit"] == "ms"
    events = doc["traceEvents"]
    lanes = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e["ph"] == "M" and e["name"] == "thread_name"}
    spans = [e for e in events if e["ph"] == "X"]
    for e in spans:
        assert isinstance(e["name"], str) and isinstance(e["pid"], int)
        assert isinstance(e["ts"], float) and e["dur"] >= 0
        assert (e["pid"], e["tid"]) in lanes, e
    return spans, lanes


def assert_nested(spans: list[dict]) -> None:
    """Within each lane, any two spans are disjoint or one lies inside the other."""
    by_lane: dict[tuple[int, int], list[dict]] = {}
    for e in spans:
        by_lane.setdefault((e["pid"], e["tid"]), []).append(e)
    for lane in by_lane.values():
        stack: list[dict] = []
        for e in sorted(lane, key=lambda e: (e["ts"], -e["dur"])):
            while stack and e["ts"] >= stack[-1]["ts"] + stack[-1]["dur"] - EPS_US:
                stack.pop()
            if stack:
                parent = stack[-1]
                assert e["ts"] + e["dur"] <= parent["ts"] + parent["dur"] + EPS_US, \
                    f"{e['name']} overlaps the end of {parent['name']}"
            stack.append(e)


def assert_within_steps(spans: list[dict], lanes: dict, names=("forward", "update")) -> None:
    """Every span named in `names` lies inside one of its rank's step spans."""
    steps = [e for e in spans if lanes[(e["pid"], e["tid"])] == "step"]
    for e in spans:
        if e["name"] in names:
            assert any(s["pid"] == e["pid"] and s["ts"] - EPS_US <= e["ts"] and
                       e["ts"] + e["dur"] <= s["ts"] + s["dur"] + EPS_US for s in steps), e


# -- one process, in-process stages ----------------------------------------------------------


def test_tracing_off_records_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)

    def refuse(*a, **k):
        raise AssertionError("a span was recorded with tracing off")

    monkeypatch.setattr(trace._Tracer, "add", refuse)
    engine = _engine()
    for step in range(2):
        engine.train_step(*_batch(step), step)
    engine.calibrate(*_batch(9), 2)
    assert not trace.enabled() and not trace.recording()
    assert trace.span("a", x=1) is trace.span("b") is trace.step(3)  # one shared no-op
    assert trace.save() is None
    assert list(tmp_path.iterdir()) == []
    # Off, a span costs about a function call (loose bound: shared CPUs).
    t0 = time.perf_counter()
    for i in range(100_000):
        with trace.span("forward", stage=0, mb=i):
            pass
    assert time.perf_counter() - t0 < 1.0


def test_the_window_skips_records_and_saves_by_itself(tmp_path):
    trace.enable(tmp_path, 0, skip=2, steps=3)
    engine = _engine()
    path = tmp_path / "trace_rank0.json"
    for step in range(2):
        engine.train_step(*_batch(step), step)  # skipped (warm-up)
    engine.train_step(*_batch(2), 2)  # recorded: step 2, its calibration, step 3
    engine.calibrate(*_batch(9), 2)
    engine.train_step(*_batch(3), 3)
    assert not path.exists()
    engine.train_step(*_batch(4), 4)  # the window closed as this step began: file written
    assert path.exists() and not trace.recording()
    spans, lanes = load(path)
    steps = [(e["name"], e["args"]["step"]) for e in spans if lanes[(0, e["tid"])] == "step"]
    assert steps == [("step", 2), ("calibration", 2), ("step", 3)]
    names = {e["name"] for e in spans}
    assert {"forward", "recv", "send", "loss", "backward", "update", "optimiser",
            "all_reduce", "flush"} <= names, names
    assert {lanes[(0, e["tid"])] for e in spans} == {"step", "compute", "comm"}
    by_name = {e["name"]: lanes[(0, e["tid"])] for e in spans}
    assert by_name["recv"] == by_name["send"] == "comm" and by_name["forward"] == "compute"
    assert_nested(spans)
    assert_within_steps(spans, lanes, ("forward", "recv", "update", "optimiser", "backward"))
    # The optimiser steps (the weights' and GrAPE's B optimiser's) lie inside the updates.
    updates = [e for e in spans if e["name"] == "update"]
    optimiser = [e for e in spans if e["name"] == "optimiser"]
    assert len(optimiser) > len(updates)  # B steps too
    for o in optimiser:
        assert any(u["ts"] - EPS_US <= o["ts"] and o["ts"] + o["dur"] <= u["ts"] + u["dur"]
                   + EPS_US for u in updates), o
    assert trace.save() == path  # idempotent: the file stays as written
    assert load(path)[0] == spans


def test_the_trainer_flags(tmp_path):
    assert trace_folder(parse_args(["--out", str(tmp_path)])) is None
    assert trace_folder(parse_args(["--out", str(tmp_path), "--trace"])) == tmp_path / "trace"
    assert trace_folder(parse_args(["--trace", "x", "--out", "y"])) == Path("x")
    with pytest.raises(UsageError, match="--out"):
        trace_folder(parse_args(["--trace"]))
    with pytest.raises(UsageError, match="overrides before"):
        trace_folder(parse_args(["--out", "y", "--trace", "rule=dfa"]))
    with pytest.raises(UsageError, match="--trace-steps"):
        trace_folder(parse_args(["--trace", "x", "--trace-steps", "0"]))


def test_the_trainer_traces_one_process(tmp_path):
    out = tmp_path / "run"
    r = run(1, *TRAIN, "--out", str(out), "--trace", "--trace-steps", "3", "--trace-skip", "2")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in (out / "trace").iterdir()) == ["trace_rank0.json"]
    spans, lanes = load(out / "trace" / "trace_rank0.json")
    assert {e["pid"] for e in spans} == {0}
    assert [e["args"]["step"] for e in spans if e["name"] == "step"] == [2, 3, 4]
    assert {"step", "forward", "loss", "backward", "update", "optimiser"} <= \
        {e["name"] for e in spans}
    assert_nested(spans)
    assert_within_steps(spans, lanes)


# -- two gloo ranks --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """A 2-rank GrAPE run traced for 3 steps after 2: its trace folder."""
    if not TORCHRUN.exists():
        pytest.skip("torchrun not installed")
    out = tmp_path_factory.mktemp("two") / "run"
    r = run(2, *TRAIN, "--out", str(out), "--trace", "--trace-steps", "3", "--trace-skip", "2")
    assert r.returncode == 0, r.stderr
    return out / "trace"


def test_two_gloo_ranks_write_one_timeline_each(two_ranks):
    assert sorted(p.name for p in two_ranks.iterdir()) == ["trace_rank0.json",
                                                           "trace_rank1.json"]
    per_rank = {}
    for rank in (0, 1):
        spans, lanes = load(two_ranks / f"trace_rank{rank}.json")
        assert {e["pid"] for e in spans} == {rank}
        assert set(lanes.values()) >= {"step", "compute", "comm"}
        assert_nested(spans)
        assert_within_steps(spans, lanes, ("forward", "update", "recv", "send", "broadcast",
                                           "broadcast wait"))
        per_rank[rank] = spans
    names = [{e["name"] for e in per_rank[r]} for r in (0, 1)]
    # Stage 0 sends and waits for the broadcast; stage 1 receives, computes the loss, sends it.
    assert {"step", "forward", "send", "broadcast", "broadcast wait", "update",
            "optimiser"} <= names[0]
    assert {"step", "forward", "recv", "loss", "broadcast", "update", "optimiser"} <= names[1]
    assert "recv" not in names[0] and "send" not in names[1]
    # One clock: rank 1's k-th step overlaps rank 0's k-th step (it waits on rank 0's sends).
    steps = [[e for e in per_rank[r] if e["name"] == "step"] for r in (0, 1)]
    assert [e["args"]["step"] for e in steps[0]] == [e["args"]["step"] for e in steps[1]]
    for a, b in zip(*steps):
        assert a["ts"] < b["ts"] + b["dur"] and b["ts"] < a["ts"] + a["dur"]


def test_the_report_draws_the_ranks_timelines(two_ranks, tmp_path, capsys):
    png = tmp_path / "timeline.png"
    assert report.main(["timeline", str(two_ranks), "--out", str(png), "--steps", "2"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    printed = capsys.readouterr().out
    assert "rank 0 (compute busy" in printed and "rank 1 (compute busy" in printed
    assert report.main(["timeline", str(tmp_path / "nothing")]) == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report.main(["timeline", str(empty)]) == 2
    assert "no trace_rank" in capsys.readouterr().err


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")
def test_torch_pipelining_schedules_are_traced(tmp_path):
    out = tmp_path / "run"
    r = run(2, *TRAIN, "rule=bp", "pipeline.schedule=1f1b", "data.drop_last=true", "--out",
            str(out), "--trace", "--trace-steps", "2", "--trace-skip", "1")
    assert r.returncode == 0, r.stderr
    for rank in (0, 1):
        spans, lanes = load(out / "trace" / f"trace_rank{rank}.json")
        names = {e["name"] for e in spans}
        assert {"step", "forward", "backward", "p2p wait", "update", "optimiser"} <= names
        fwd = [e for e in spans if e["name"] == "forward"]
        assert sorted(e["args"]["mb"] for e in fwd) == [0, 0, 1, 1]  # 2 steps x 2 mbs
        assert {e["args"]["stage"] for e in fwd} == {rank}
        assert_nested(spans)
        assert_within_steps(spans, lanes, ("forward", "backward", "p2p wait"))
