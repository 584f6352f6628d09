"""The pipeline driven in one process: stages called in order, no communication.

With one stage this is the single-process trainer; with several it runs exactly the schedule the
distributed runtime runs across ranks (forward per micro-batch, broadcast signal, concurrent
local updates, step at the end of the mini-batch), which makes it the reference for the
1-vs-P equivalence tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..rules import MicroBatch, StageRule, output_signal
from .stage import Stage


@dataclass
class StepResult:
    loss_sum: float
    correct: int
    samples: int
    stats: dict[str, float] = field(default_factory=dict)


def split_micro_batches(total: int, micro_batches: int) -> list[tuple[int, int]]:
    """(start, size) of each micro-batch; sizes differ by at most one."""
    m = min(micro_batches, total)
    base, extra = divmod(total, m)
    out, start = [], 0
    for i in range(m):
        size = base + (i < extra)
        out.append((start, size))
        start += size
    return out


def run_mini_batch(
    rules: list[StageRule], x: torch.Tensor, y: torch.Tensor, step: int, micro_batches: int
) -> StepResult:
    """One mini-batch through `rules` (the stages' rules, in pipeline order)."""
    total = x.shape[0]
    result = StepResult(0.0, 0, total)
    for index, (start, size) in enumerate(split_micro_batches(total, micro_batches)):
        mb = MicroBatch(step, index, start, size, total)
        h, t = x[start:start + size], None
        for rule in rules:
            h, t = rule.forward(mb, h, t)
        loss_sum, correct, signal = output_signal(h, y[start:start + size], total, t)
        result.loss_sum += loss_sum
        result.correct += correct
        grad = None
        for rule in reversed(rules):
            grad = rule.backward(mb, signal, grad)
        if rules[0].second_pass:
            h_err = None
            for rule in rules:
                h_err = rule.modulated_forward(mb, signal, h_err)
    for rule in rules:
        result.stats.update(rule.finish_step())
    return result


class LocalPipeline:
    """Stages in one process (one data-parallel replica)."""

    def __init__(self, stages: list[Stage], micro_batches: int = 1) -> None:
        self.stages = stages
        self.micro_batches = micro_batches

    def train_step(self, x: torch.Tensor, y: torch.Tensor, step: int, offset: int = 0,
                   total: int | None = None) -> StepResult:
        return run_mini_batch([s.rule for s in self.stages], x, y, step, self.micro_batches)

    def calibrate(self, x: torch.Tensor, y: torch.Tensor, step: int, offset: int = 0,
                  total: int | None = None) -> StepResult:
        """One exact BP step through every stage on one mini-batch."""
        rules = [s.calibration for s in self.stages]
        if any(r is None for r in rules):
            raise RuntimeError("calibration is off for this run (calibration.every_epochs = 0)")
        return run_mini_batch(rules, x, y, step, self.micro_batches)

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> torch.Tensor:
        for s in self.stages:
            x = s.rule.infer(x)
        return x

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> tuple[float, int]:
        """(summed loss, correct) over (x, y), moved chunk by chunk to the model's device."""
        loss, correct = 0.0, 0
        device = self.stages[0].rule.device
        for start in range(0, len(y), batch_size):
            logits = self.infer(x[start:start + batch_size].to(device))
            l_sum, c, _ = output_signal(logits, y[start:start + batch_size].to(device), 1, None)
            loss += l_sum
            correct += c
        return loss, correct

    def merge_stats(self, stats: dict[str, float]) -> dict[str, float]:
        return stats

    def gather_model(self, model) -> dict[int, torch.Tensor]:
        """Every block already lives in `model`; returns all feedback matrices."""
        out: dict[int, torch.Tensor] = {}
        for s in self.stages:
            out.update(s.rule.feedback_matrices())
        return out
