"""Watching a run: the progress line (ETA, fixed-width numbers) and TensorBoard scalars read
back from the event files TensorBoard itself would load."""

from __future__ import annotations

import io
import math
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from grape_dist.metrics.progress import (
    VALUE_WIDTH,
    Progress,
    format_duration,
    format_rate,
    format_value,
)
from grape_dist.metrics.tensorboard import TensorBoardWriter


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_eta_and_rate_from_a_fake_clock() -> None:
    clock, out = Clock(), io.StringIO()
    bar = Progress(100, "epoch 1/3", stream=out, clock=clock)
    assert "ETA --:--:--" in bar.line(clock())  # nothing done yet: unknown
    clock.t += 10.0
    bar.update(5, loss=2.5)
    assert out.getvalue() == ""  # not a tty: at most one line per 30 s
    clock.t += 40.0
    bar.update(20, loss=2.5)  # 25 steps in 50 s: 2 s/it, 75 left -> 150 s
    assert out.getvalue() == ("epoch 1/3 [######..................]  25/100    2.0 s/it "
                              "ETA 00:02:30 loss    2.5000\n")
    clock.t += 25.0
    bar.update(75, loss=0.25)  # the last step prints at once
    line = out.getvalue().splitlines()[-1]
    assert "100/100" in line and "ETA 00:00:00" in line and "   1.3 it/s" in line


def test_the_runs_eta_counts_the_later_epochs() -> None:
    """Epoch 1 of 3 with 100 steps each: after 25 steps in 50 s, 75 + 200 steps are left."""
    clock = Clock()
    bar = Progress(100, "epoch 1/3", stream=io.StringIO(), clock=clock, rest_of_run=200)
    clock.t += 50.0
    bar.n = 25
    assert "ETA 00:02:30 run 00:09:10" in bar.line(clock())


def test_line_width_is_fixed() -> None:
    """Whatever the values, a redrawn line keeps its length and its columns."""
    clock, out = Clock(), Tty()
    bar = Progress(1000, "epoch 1/3", stream=out, every_s=0.0, clock=clock)
    values = [2.302585, 0.0001234, 123.456, -0.5, 1e6, float("nan"), 0.0, -1234.5, 7]
    lines = []
    for i, v in enumerate(values):
        clock.t += 0.01 * 10 ** (i % 5)  # rates from ~1000 it/s to 0.1 it/s
        bar.update(1 + 20 * i, loss=v, acc=values[-1 - i])
        lines.append(out.getvalue().split("\r")[-1].removesuffix("\033[K"))
    assert len({len(ln) for ln in lines}) == 1, lines
    for column in ("/1000", "it/s", "ETA", "acc"):
        assert len({ln.index(column) for ln in lines}) == 1, column
    bar.close()
    assert out.getvalue().endswith("\r\033[K")


@pytest.mark.parametrize("v", [0.0, 1e-9, 1e-3, 0.1234567, 999.99996, -999.99996, 12345.6,
                               -1e-5, 1e300, -1e300, math.inf, -math.inf, math.nan, 3, True])
def test_value_width(v: float) -> None:
    assert len(format_value(v)) == VALUE_WIDTH


def test_duration_and_rate_formats() -> None:
    assert format_duration(None) == "--:--:--"
    assert format_duration(3723.4) == "01:02:03"
    assert len(format_duration(100 * 3600)) == 8
    assert [len(format_rate(r)) for r in (0.0, 1e-6, 0.5, 1.0, 37.25, 1e9)] == [11] * 6


def test_disabled_prints_nothing() -> None:
    out = Tty()
    bar = Progress(3, "x", enabled=False, stream=out)
    for _ in range(3):
        bar.update(loss=1.0)
    bar.close()
    assert out.getvalue() == "" and bar.n == 3


# -- TensorBoard ---------------------------------------------------------------------------


def scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})  # 0: keep all
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


TRAIN_ROW = {"epoch": 1, "step": 79, "split": "train", "loss": 2.33, "accuracy": 0.1045}
TEST_ROW = {"epoch": 1, "step": 79, "split": "test", "loss": 2.16, "accuracy": 0.1858,
            "perplexity": 8.67, "calibrated": True, "trigger_grad_cos": 0.42,
            "alignment": {"fc1": {"grad_cos": 0.75, "jac_cos": 0.77, "jhat_cos": 0.3},
                          "res1.0": {"grad_cos": -0.01, "train_col_cos": 0.2}}}


def test_tensorboard_round_trip(tmp_path: Path) -> None:
    log_dir = tmp_path / "tensorboard"
    with TensorBoardWriter(log_dir, step_every=2) as tb:
        assert tb.enabled
        tb.config({"rule": "grape", "optim": {"lr": 0.001}})
        for step in range(1, 6):
            tb.step(step, loss=3.0 - 0.1 * step, step_time_ms=10.0 + step, lr=1e-3)
        tb.evaluation(TRAIN_ROW)
        tb.evaluation(TEST_ROW, step_time_ms=12.5)
        tb.evaluation({**TEST_ROW, "epoch": 2, "step": 158, "calibrated": False,
                       "loss": float("nan"), "alignment": {}})
        tb.calibration(79, 1)
    got = scalars(log_dir)
    approx = pytest.approx
    assert got["step/loss"] == [(2, approx(2.8)), (4, approx(2.6))]  # every 2nd step
    assert got["step/step_time_ms"] == [(2, approx(12.0)), (4, approx(14.0))]
    assert got["step/lr"] == [(2, approx(1e-3)), (4, approx(1e-3))]
    assert got["train/loss"] == [(79, approx(2.33))]
    assert got["train/accuracy"] == [(79, approx(0.1045))]
    assert "train/perplexity" not in got
    assert got["test/loss"] == [(79, approx(2.16))]  # the NaN of step 158 is left out
    assert got["test/accuracy"] == [(79, approx(0.1858)), (158, approx(0.1858))]
    assert got["test/perplexity"] == [(79, approx(8.67)), (158, approx(8.67))]
    assert got["calibration/calibrated"] == [(79, 1.0), (158, 0.0)]
    assert got["calibration/trigger_grad_cos"][0] == (79, approx(0.42))
    assert got["calibration/count"] == [(79, 1.0)]
    assert got["time/step_time_ms"] == [(79, approx(12.5))]
    assert got["epoch"] == [(79, 1.0), (79, 1.0), (158, 2.0)]
    assert got["alignment/fc1/grad_cos"] == [(79, approx(0.75))]
    assert got["alignment/fc1/jac_cos"] == [(79, approx(0.77))]
    assert got["alignment/res1.0/train_col_cos"] == [(79, approx(0.2))]
    assert "alignment/res1.0/jac_cos" not in got
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    assert "config" in " ".join(acc.Tags()["tensors"])  # the config in the Text tab


def test_tensorboard_resume_purges_later_steps(tmp_path: Path) -> None:
    """A run resumed from its step-5 checkpoint: the steps the crashed run logged after it are
    dropped, so the curve does not fold back on itself."""
    with TensorBoardWriter(tmp_path) as tb:
        for step in range(1, 11):
            tb.step(step, loss=float(step))
    with TensorBoardWriter(tmp_path, purge_step=6) as tb:
        for step in range(6, 9):
            tb.step(step, loss=100.0 + step)
    assert scalars(tmp_path)["step/loss"] == [
        (s, float(s)) for s in range(1, 6)] + [(s, 100.0 + s) for s in range(6, 9)]


def test_tensorboard_none_is_a_no_op(tmp_path: Path) -> None:
    tb = TensorBoardWriter(None)
    assert not tb.enabled
    tb.step(1, loss=1.0)
    tb.evaluation(TEST_ROW)
    tb.calibration(1, 1)
    tb.config({"a": 1})
    tb.close()
    assert list(tmp_path.iterdir()) == []
