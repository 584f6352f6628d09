"""How a run stops early: asked to (SIGINT/SIGTERM, after a checkpoint), or because a loss,
weight or feedback matrix is no longer finite (with no checkpoint, so that the last one is the
last good one). Both are decided after every step, by every rank together."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .runtime import Stage


class TrainingInterrupted(Exception):
    """The run was asked to stop (SIGINT/SIGTERM) and wrote a checkpoint after its last
    step."""

    def __init__(self, epoch: int, step: int, checkpoint: Path | None) -> None:
        super().__init__(f"interrupted in epoch {epoch} after step {step}")
        self.epoch, self.step, self.checkpoint = epoch, step, checkpoint


class NonFiniteError(Exception):
    """NaN or Inf in the loss, a block's weights or its feedback matrix: the run stops on that
    step, on every rank, and writes no checkpoint (the previous one stays the last good one)."""

    def __init__(self, epoch: int, step: int, where: list[str],
                 checkpoint: Path | None) -> None:
        super().__init__(f"non-finite values after step {step} (epoch {epoch}) in "
                         f"{', '.join(where)}")
        self.epoch, self.step, self.where, self.checkpoint = epoch, step, where, checkpoint


def nonfinite_blocks(stages: list[Stage], loss: float) -> list[str]:
    """Which of `stages`' blocks hold NaN or Inf in their weights or feedback matrix, plus
    "loss" if the step's loss is not finite. One reduction per tensor and one host read per
    step; the blocks are named only when something is wrong."""
    checks = []  # (name, the tensor's sum): a NaN or Inf anywhere makes the sum non-finite
    for stage in stages:
        for block in stage.blocks:
            checks += [(f"{block.name} (weights)", p.detach().sum())
                       for p in block.parameters()]
        feedback = stage.rule.feedback_matrices()
        checks += [(f"{pt.name} (feedback matrix)", feedback[pt.index].sum())
                   for pt in stage.rule.feedback_points()]
    bad = [] if math.isfinite(loss) else ["loss"]
    if checks:
        finite = torch.isfinite(torch.stack([c for _, c in checks]))
        if not bool(finite.all()):
            bad += list(dict.fromkeys(n for (n, _), ok in zip(checks, finite.tolist())
                                      if not ok))
    return bad
