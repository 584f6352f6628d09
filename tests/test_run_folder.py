"""One run per folder: the lock on --out (grape_dist/run_folder.py), with real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from grape_dist import train
from grape_dist.run_folder import LOCK_FILE

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "mnist_mlp_dfa.yaml")
SMALL = ["--quiet", "data.train_subset=512", "data.test_subset=128", "model.hidden=[16]",
         "train.threads=1"]
HOLD = ("import sys, time; from pathlib import Path; from grape_dist.run_folder import RunLock;"
        " RunLock(Path(sys.argv[1])).acquire(); print('locked', flush=True); time.sleep(120)")


def _holder(out: Path) -> subprocess.Popen:
    """Another process holding the lock on `out`, once it says so."""
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE,
                         text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.stdout.readline().strip() == "locked"
    return p


def _run(out: Path, *extra: str, capfd) -> tuple[int, list[str]]:
    capfd.readouterr()
    rc = train.main(["--config", CONFIG, *SMALL, "train.epochs=1", "--out", str(out), *extra])
    return rc, [line for line in capfd.readouterr().err.splitlines() if line.strip()]


def test_a_run_into_a_folder_in_use_is_refused_and_a_dead_holders_lock_is_stale(tmp_path,
                                                                               capfd):
    out = tmp_path / "out"
    holder = _holder(out)
    try:
        rc, lines = _run(out, capfd=capfd)
        assert rc == 2 and len(lines) == 1, lines
        assert f"in use by a running run (pid {holder.pid} on " in lines[0], lines[0]
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE], "the refused run wrote"
        # --overwrite must not clear a run that is still going either.
        rc, lines = _run(out, "--overwrite", capfd=capfd)
        assert rc == 2 and "in use by a running run" in lines[0], lines
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # Its holder died: the kernel dropped the lock, the next run takes the folder.
    rc, lines = _run(out, capfd=capfd)
    assert rc == 0, lines
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_overwrite_cannot_clear_a_run_that_is_still_training(tmp_path, capfd):
    """A real run in another process holds its --out while it trains: a second run with
    --overwrite is refused (it would have removed the first one's files under it), and the
    first finishes with only its own metrics."""
    out = tmp_path / "out"
    first = subprocess.Popen(
        [sys.executable, "-m", "grape_dist.train", "--config", CONFIG, *SMALL,
         "train.epochs=5000", "--out", str(out)],  # far more than the test waits for
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE,
        text=True)
    try:
        deadline = time.time() + 120
        while not (out / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.2)
        assert (out / "metrics.jsonl").exists(), "the first run did not start"
        rc, lines = _run(out, "--overwrite", capfd=capfd)
        assert rc == 2 and f"(pid {first.pid} on " in lines[0], lines
    finally:
        first.send_signal(signal.SIGINT)  # stops after its step, with a checkpoint
        _, err = first.communicate(timeout=120)
    assert first.returncode == 130, err[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["epoch"] == i // 2 + 1 for i, r in enumerate(rows)), rows

