"""Other launchers: the Ray Train entry point on a real local Ray (2 CPUs) and the deepspeed
launcher give the same run folder and trajectory as torchrun with the same ranks; checkpoints are
reported to Ray; bad input is refused before Ray starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
RUN = ["--config", "configs/mnist_mlp_grape.yaml", "--quiet", "data.train_subset=1024",
       "data.test_subset=256", "model.hidden=[32,32]", "train.epochs=2", "train.threads=1",
       "calibration.every_epochs=1", "pipeline.micro_batches=2"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1",
       "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}



def run(cmd: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


def test_ray_job_follows_the_torchrun_trajectory(tmp_path):
    pytest.importorskip("ray.train")
    r = run([sys.executable, "-m", "grape_dist.ray_job", "--num-workers", "2",
             "--out", str(tmp_path / "ray"), *RUN, "train.keep_checkpoints=1"])
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    assert "2 Ray workers" in r.stdout
    r = run([str(TORCHRUN), "--nproc_per_node=2", "--standalone", "-m", "grape_dist.train",
             "--out", str(tmp_path / "torchrun"), *RUN])
    assert r.returncode == 0, r.stderr[-3000:]
    ray_rows = (tmp_path / "ray" / "metrics.jsonl").read_text()
    assert ray_rows == (tmp_path / "torchrun" / "metrics.jsonl").read_text()
    summary = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert (summary["world_size"], summary["pp"], summary["calibration_steps"]) == (2, 2, 2)
    # The epochs' checkpoints went through Ray's checkpoint API into the run folder, and Ray
    # keeps as many as the run does (train.keep_checkpoints=1 here).
    reported = list((tmp_path / "ray" / "ray").rglob("manifest.json"))
    assert len(reported) == 1, reported
    assert all(json.loads(m.read_text())["world_size"] == 2 for m in reported)


def test_ray_job_refuses_bad_input_before_starting_ray(tmp_path):
    r = run([sys.executable, "-m", "grape_dist.ray_job", "--num-workers", "2",
             "--config", "configs/mnist_mlp_grape.yaml", "rule=nope"])
    assert r.returncode == 2 and "rule" in r.stderr and "Traceback" not in r.stderr
    r = run([sys.executable, "-m", "grape_dist.ray_job", "--num-workers", "9",
             "--config", "configs/mnist_mlp_grape.yaml"])
    assert r.returncode == 2 and "blocks" in r.stderr, r.stderr


def test_deepspeed_launcher_runs_the_trainer_like_torchrun(tmp_path):
    """`deepspeed --num_gpus 2 --module grape_dist.train ...` (on the CPU accelerator here):
    its environment (RANK, WORLD_SIZE, MASTER_ADDR) and `--local_rank` argument give the same
    2-rank run as torchrun."""
    launcher = Path(sys.executable).parent / "deepspeed"
    if not launcher.exists():
        pytest.skip("deepspeed not installed")
    r = run([str(launcher), "--num_gpus", "2", "--master_port", "29731", "--module",
             "grape_dist.train", "--out", str(tmp_path / "ds"), *RUN])
    assert r.returncode == 0, (r.stdout[-3000:], r.stderr[-3000:])
    assert "--local_rank=1" in r.stdout + r.stderr  # the launcher's own argument reached us
    r = run([str(TORCHRUN), "--nproc_per_node=2", "--standalone", "-m", "grape_dist.train",
             "--out", str(tmp_path / "torchrun"), *RUN])
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "ds" / "metrics.jsonl").read_text() == \
        (tmp_path / "torchrun" / "metrics.jsonl").read_text()
    assert json.loads((tmp_path / "ds" / "summary.json").read_text())["world_size"] == 2


def test_ray_restarts_a_failed_worker_group_from_the_last_checkpoint(tmp_path):
    """Rank 1 is SIGKILLed after step 12 (epoch 2 of 2; the checkpoint at step 8 is epoch 1's end);
    FailureConfig(max_failures=1) restarts the group, which resumes from the checkpoint Ray
    persisted and ends exactly like an uninterrupted run."""
    pytest.importorskip("ray.train")
    marker = tmp_path / "fired"
    env = {**ENV, "GRAPE_FAULT": f"kill:step=12:rank=1:once={marker}"}
    r = subprocess.run([sys.executable, "-m", "grape_dist.ray_job", "--num-workers", "2",
                        "--max-failures", "1", "--out", str(tmp_path / "ray"), *RUN],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-4000:])
    assert marker.exists()  # the fault did fire
    r = run([str(TORCHRUN), "--nproc_per_node=2", "--standalone", "-m", "grape_dist.train",
             "--out", str(tmp_path / "torchrun"), *RUN])
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "ray" / "metrics.jsonl").read_text() == \
        (tmp_path / "torchrun" / "metrics.jsonl").read_text()
