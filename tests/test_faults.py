"""Peer failures and crashes under real torchrun process groups: a rank killed (SIGKILL) or hung
makes the others stop with one clear line within pipeline.timeout_s; `torchrun --max-restarts`
resumes from the last checkpoint and ends exactly like an uninterrupted run; a rank killed while
a checkpoint is being written leaves the previous checkpoint usable.

Faults are injected with GRAPE_FAULT (grape_dist/faults.py): the process dies or stops
answering at a chosen step, as a lost node or a stuck rank would."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from training_runs import RUN, TORCHRUN, assert_same_results, run

pytestmark = pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun not installed")

# 16 steps per epoch, 2 epochs; checkpoints at steps 5, 10, 15, 16 (epoch end), 20, ...
CKPT = ["train.checkpoint_every_steps=5", "train.keep_checkpoints=100"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "run"
    r = run(2, *RUN, *CKPT, "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def _ours(stderr: str) -> list[str]:
    """Our lines, without torchrun's own log lines and failure summary."""
    return [line for line in stderr.splitlines() if line.startswith(("error", "config error"))]


@pytest.mark.parametrize("fault,timeout_s,reason", [
    # The socket closes: seen at once, not at the timeout. Gloo words it either way, by which
    # side of the connection notices first.
    ("kill", 120, ("Connection reset", "Connection closed")),
    ("hang", 4, ("Timed out",)),  # nothing arrives: seen when pipeline.timeout_s runs out
])
def test_a_lost_peer_stops_the_job_with_one_line_within_the_timeout(
        fault, timeout_s, reason, tmp_path):
    out = tmp_path / "run"
    t0 = time.monotonic()
    r = run(2, *RUN, *CKPT, f"pipeline.timeout_s={timeout_s}", "--out", str(out),
            env={"GRAPE_FAULT": f"{fault}:step=12:rank=1"})
    elapsed = time.monotonic() - t0
    assert r.returncode != 0
    lines = _ours(r.stderr)
    assert len(lines) == 1, r.stderr[-4000:]
    assert lines[0].startswith("error (rank 0): lost a peer after step 12"), lines[0]
    assert any(r in lines[0] for r in reason), lines[0]
    assert "step_000000010" in lines[0] and f"--resume {out}" in lines[0], lines[0]
    assert 'File "' + str(Path(__file__).resolve().parents[1] / "grape_dist") not in r.stderr
    # Start-up and 12 steps take seconds; a hang that waited for nothing would reach the
    # subprocess timeout (300 s) instead.
    assert elapsed < timeout_s + 60, elapsed


@pytest.mark.parametrize("step", [12, 3], ids=["after-a-checkpoint", "before-any-checkpoint"])
def test_torchrun_max_restarts_resumes_from_the_last_checkpoint(uninterrupted, step, tmp_path):
    """Rank 1 is SIGKILLed after `step`; torchrun restarts both ranks, which continue from the
    newest checkpoint in --out (step 10), or start the run over when there is none yet (step
    3), and end with exactly the uninterrupted run's metrics, weights and B."""
    out = tmp_path / "run"
    marker = tmp_path / "killed"
    r = run(2, *RUN, *CKPT, "--out", str(out), restarts=1,
            env={"GRAPE_FAULT": f"kill:step={step}:rank=1:once={marker}"})
    assert r.returncode == 0, r.stderr[-4000:]
    assert marker.exists(), "the fault never fired"
    # The first attempt failed (rank 0 lost its peer), the job still succeeded: restarted.
    assert f"lost a peer after step {step}" in r.stderr, r.stderr[-3000:]
    assert_same_results(uninterrupted, out)


def test_a_kill_while_saving_leaves_the_previous_checkpoint_usable(uninterrupted, tmp_path):
    """Rank 1 dies after writing its shard of the step-10 checkpoint, before the commit: the
    half-written folder stays `.partial`, `latest` still names step 5, and resuming from it
    ends like the uninterrupted run."""
    out = tmp_path / "run"
    r = run(2, *RUN, *CKPT, "--out", str(out), "pipeline.timeout_s=30",
            env={"GRAPE_FAULT": "kill:step=10:rank=1:at=save"})
    assert r.returncode != 0
    checkpoints = out / "checkpoints"
    assert (checkpoints / "step_000000010.partial").is_dir()
    assert not (checkpoints / "step_000000010").exists()
    assert (checkpoints / "latest").read_text().strip() == "step_000000005"
    (out / "summary.json").unlink(missing_ok=True)
    r = run(2, "--resume", str(out), "--quiet")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_results(uninterrupted, out)
    assert json.loads((out / "summary.json").read_text())["steps"] == 32


def test_a_damaged_shard_stops_every_rank_with_one_line(uninterrupted, tmp_path):
    """A flipped byte in rank 1's shard, on 2 ranks: rank 0 checks every rank's file against
    the manifest before anything is loaded, all ranks stop, and one line names the file."""
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out)
    shard = out / "checkpoints" / "step_000000032" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    r = run(2, "--resume", str(out), "--quiet", "train.epochs=3")
    assert r.returncode != 0
    lines = _ours(r.stderr)
    assert len(lines) == 1 and "__1_0.distcp" in lines[0] and "SHA-256" in lines[0], r.stderr
