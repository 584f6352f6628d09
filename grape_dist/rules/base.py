"""The interface every learning rule implements for one pipeline stage.

A stage holds a contiguous range of a model's blocks. For each micro-batch a schedule calls
`forward` on every stage in order, computes the `OutputSignal` at the end of the pipeline
(`output_signal`), hands it to every stage (`backward`, in reverse stage order, with the
gradient from the next stage for the rules that need one), and after the last micro-batch calls
`finish_step` on every stage. One process is the pipeline with one stage: the math below runs
unchanged on 1 or P ranks. Nothing here knows about torch.distributed: a rule is given, at
construction, a `reduce` function that sums tensors over the data-parallel replicas of its stage.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models import Block, FeedbackPoint

# Sums a list of tensors in place over the data-parallel replicas of a stage.
Reduce = Callable[[list[torch.Tensor]], None]


def no_reduce(tensors: list[torch.Tensor]) -> None:
    """One replica: nothing to sum."""


@dataclass(frozen=True)
class MicroBatch:
    """Where a micro-batch sits in its global mini-batch; keys the random draws of a step."""

    step: int
    index: int  # position among this replica's micro-batches
    start: int  # first row within the global mini-batch (all replicas together)
    size: int
    total: int  # rows in the global mini-batch (the loss is a mean over them)


@dataclass
class OutputSignal:
    """What the last stage broadcasts to every stage after a micro-batch's forward."""

    # dL/d(output) of the mini-batch mean loss, one row per output position: (softmax - onehot)
    # / outputs at the logits, or its backward to the head's input (SignalSpec.at_head_input).
    error: torch.Tensor
    target: torch.Tensor  # one-hot targets (DRTP projects these), one row per position
    tangents: torch.Tensor | None  # (K, m, *tangent_tail) JVPs at the output (GrAPE)
    total: int

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.error, self.target, self.tangents) if t is not None]


def output_signal(
    logits: torch.Tensor, labels: torch.Tensor, total: int, tangents: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, OutputSignal]:
    """Cross-entropy at the logits (samples x [positions x] classes) of `total` samples:
    (summed loss, #correct, the signal to broadcast). The loss is the mean over every output
    position; the sums come back as 0-d tensors (no host synchronisation)."""
    logits = logits.detach()
    c = logits.shape[-1]
    outputs = total * (logits[0].numel() // c if len(logits) else 1)
    logits = logits.reshape(-1, c)
    labels = labels.reshape(-1)
    logp = F.log_softmax(logits, dim=1)
    loss_sum = -logp.gather(1, labels[:, None]).sum()
    correct = (logits.argmax(1) == labels).sum()
    onehot = one_hot(labels, c, logits.dtype)
    error = (logp.exp() - onehot) / outputs
    return loss_sum, correct, OutputSignal(error, onehot, tangents, total)


def one_hot(labels: torch.Tensor, classes: int, dtype: torch.dtype) -> torch.Tensor:
    """F.one_hot without its range check, which reads the labels back to the host (a device
    synchronisation each step, and no CUDA graph capture)."""
    out = torch.zeros(len(labels), classes, dtype=dtype, device=labels.device)
    return out.scatter_(1, labels[:, None], 1.0)


def accumulate_grad(p: torch.Tensor, g: torch.Tensor) -> None:
    """p.grad += g, in place (g must be a fresh tensor: it becomes p.grad when there is none)."""
    if p.grad is None:
        p.grad = g
    else:
        p.grad.add_(g)


class StageRule:
    """A learning rule's state and update math for one stage's blocks.

    `blocks[i]` is global block `first + i` of a model with `num_blocks` blocks; the last
    global block is the output (logits) block.
    """

    name = "base"
    # True for rules whose stages need the gradient of the next stage (BP, FA): the schedule
    # then runs the backward stage by stage in reverse; False for the direct rules, whose
    # stages update concurrently from the broadcast signal alone.
    sequential_backward = False
    # PEPITA: a second, modulated forward pass after the error is known.
    second_pass = False

    def __init__(self, blocks: list[Block], first: int, num_blocks: int,
                 optimizer: torch.optim.Optimizer, reduce: Reduce = no_reduce) -> None:
        self.blocks = blocks
        self.first = first
        self.num_blocks = num_blocks
        self.optimizer = optimizer  # the weights' optimiser (the runtime exposes it)
        self.reduce = reduce
        self._stash: dict[int, object] = {}  # per micro-batch, until its update

    def _apply_update(self) -> None:
        """Sum the gradients over replicas, step the weights' optimiser, clear gradients."""
        params = self.parameters()
        for p in params:
            # Every replica reduces the same list, also one that had no rows this step.
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        self.reduce([p.grad for p in params])
        self.optimizer.step()
        # Keep the gradient buffers (zeroed): the next step accumulates into them in place
        # instead of allocating (and page-faulting) fresh weight-sized tensors.
        self.optimizer.zero_grad(set_to_none=False)

    def is_output(self, index: int) -> bool:
        return index == self.num_blocks - 1

    @property
    def device(self) -> torch.device:
        """Where this stage's weights live (random draws are made on the CPU, then moved, so a
        seed gives the same numbers on any device)."""
        return next((p.device for b in self.blocks for p in b.parameters()),
                    torch.device("cpu"))

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for b in self.blocks for p in b.parameters()]

    # -- what a checkpoint holds (runtime/checkpoint.py) ---------------------------------------

    def state_parameters(self) -> list[tuple[str, torch.Tensor]]:
        """The trained tensors this stage owns, under keys global to the whole model (block
        index, feedback point index), so that any layout finds them: `blocks.<i>.<name>`."""
        return [(f"blocks.{self.first + b}.{k}", p) for b, block in enumerate(self.blocks)
                for k, p in block.named_parameters()]

    def state_optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimisers whose state a checkpoint keeps (over `state_parameters`)."""
        return [self.optimizer]

    def forward(self, mb: MicroBatch, x: torch.Tensor, tangents: torch.Tensor | None):
        """Run this stage's blocks on a micro-batch; returns (output, tangents)."""
        raise NotImplementedError

    def backward(
        self, mb: MicroBatch, signal: OutputSignal | None, grad_output: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Take the broadcast signal of `mb` (and, if `sequential_backward`, the gradient from
        the next stage, None at the last stage); returns the gradient for the previous stage,
        if `sequential_backward`."""
        raise NotImplementedError

    def modulated_forward(
        self, mb: MicroBatch, signal: OutputSignal, x_err: torch.Tensor | None
    ) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} has no second forward pass")

    def finish_step(self) -> dict[str, torch.Tensor | float]:
        """Apply the mini-batch's update; returns per-step statistics (e.g. alignment), as 0-d
        tensors where they come from the device (read once the step has finished)."""
        raise NotImplementedError

    def signal_at_output(self, mb: MicroBatch, signal: OutputSignal) -> OutputSignal:
        """At the last stage: turn the logits' signal into the one that is broadcast (the
        direct rules' error at the head's input for a language model); default: unchanged."""
        return signal

    def held_tensors(self) -> list[object]:
        """What this stage keeps for the current mini-batch (stashes): the runtime holds a
        reference while the stage's update runs on another CUDA stream, so that memory made on
        one stream is not handed out again before the other stream has used it."""
        return [dict(self._stash)]

    def output_tangent_shape(self, mb: MicroBatch) -> tuple[int, int] | None:
        """(streams, rows) of the output tangents micro-batch `mb` produces; None: no tangents.
        Lets every stage size the broadcast signal in advance."""
        return None

    def in_flight(self) -> int:
        """Micro-batches stashed and not yet used by an update (0 after `finish_step`)."""
        return len(self._stash)

    def reset_step(self) -> None:
        """Drop everything stashed for the current mini-batch without updating (used to abandon
        a step, and by tests that sample the estimators at fixed weights)."""
        self._stash = {}

    @torch.no_grad()
    def infer(self, x: torch.Tensor) -> torch.Tensor:
        """Evaluation: the blocks in eval mode (BatchNorm's running statistics, which it does
        not update), then back in train mode."""
        for block in self.blocks:
            block.eval()
        try:
            for block in self.blocks:
                x = block(x)
        finally:
            for block in self.blocks:
                block.train()
        return x

    # Feedback matrices by global feedback-point index (direct rules); empty for the others.
    def feedback_matrices(self) -> dict[int, torch.Tensor]:
        return {}

    def feedback_points(self) -> list[FeedbackPoint]:
        """Where this stage's feedback matrices sit (direct rules); empty for the others."""
        return []
