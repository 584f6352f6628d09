"""Launching real training runs (one process, or torchrun) and comparing their results, shared
by the checkpoint and fault tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from grape_dist.runtime import load_final_state

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
# GrAPE with Adam (optimiser state), calibration every epoch (its own optimiser), 16 steps per
# epoch, checkpoints every 5 steps: 5 and 10 are mid-epoch, 16 an epoch end.
RUN = ["--config", "configs/mnist_mlp_grape.yaml", "--quiet", "data.train_subset=2048",
       "data.test_subset=512", "model.hidden=[64,64]", "train.epochs=2", "train.threads=1",
       "train.save_final=true", "calibration.every_epochs=1", "pipeline.micro_batches=2"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def launch(nproc: int, *args: str, env: dict[str, str] | None = None, restarts: int = 0,
           **kw) -> subprocess.Popen:
    """`python -m grape_dist.train ARGS` (nproc 1) or torchrun with nproc ranks on this machine;
    `env` adds variables (GRAPE_FAULT, say), `restarts` is torchrun's --max-restarts."""
    cmd = [sys.executable, "-m", "grape_dist.train"] if nproc == 1 else \
        [str(TORCHRUN), f"--nproc_per_node={nproc}", "--standalone",
         f"--max-restarts={restarts}", "-m", "grape_dist.train"]
    return subprocess.Popen([*cmd, *args], cwd=ROOT, env={**ENV, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def run(nproc: int, *args: str, **kw) -> subprocess.CompletedProcess:
    p = launch(nproc, *args, **kw)
    out, err = p.communicate(timeout=300)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def assert_same_results(a: Path, b: Path) -> None:
    """Every metrics row identical (alignment included), final weights and B bit for bit."""
    assert (a / "metrics.jsonl").read_text() == (b / "metrics.jsonl").read_text()
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    for k in ("final_test_accuracy", "final_test_loss", "best_test_accuracy", "steps",
              "calibration_steps"):
        assert sa[k] == sb[k], k
    fa, fb = load_final_state(a), load_final_state(b)
    for part in ("model", "feedback"):
        assert set(fa[part]) == set(fb[part])
        for k in fa[part]:
            assert torch.equal(fa[part][k], fb[part][k]), (part, k)


def assert_close_results(a: Path, b: Path) -> None:
    """The same trajectory on another layout: every metrics row (alignment included) and the
    final weights and B equal up to summation order."""
    import pytest

    ra, rb = ([json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
              for d in (a, b))
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb):
        assert (x["epoch"], x["split"], x["step"]) == (y["epoch"], y["split"], y["step"])
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-5)
        assert y["accuracy"] == pytest.approx(x["accuracy"], abs=1e-9)
        for block, metrics in x.get("alignment", {}).items():
            for k, v in metrics.items():
                assert y["alignment"][block][k] == pytest.approx(v, rel=1e-4, abs=1e-6)
    fa, fb = load_final_state(a), load_final_state(b)
    for part in ("model", "feedback"):
        assert set(fa[part]) == set(fb[part])
        for k in fa[part]:
            torch.testing.assert_close(fb[part][k], fa[part][k], rtol=1e-5, atol=1e-6)
