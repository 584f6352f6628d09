"""GrAPE's feedback learning (paper section 3, Algorithm 1), for the hidden blocks of one stage.

During the forward pass each hidden block l draws a Gaussian tangent p_l at its output on the
tangent rows of the mini-batch; the tangents travel to the logits with the activations
(`tangents.py`), giving g_l = J_l p_l. When the output signal arrives, J_hat_l = sum_s g_s p_s^T
is accumulated (unbiased for the batch-summed Jacobian). At the end of the mini-batch: one
optimiser step on L_align = 1 - mean_k cos(B_l[:, k], J_hat_l[:, k]) (gradient: eq. 17, in
closed form), then every column of B_l is renormalised. The direct rule then applies its DFA
update with the refined B_l.

Which rows carry tangents (`grape.tangent_samples` = m): m rows of the global mini-batch, evenly
spaced by global row index, so neither the micro-batching nor the data-parallel split changes
which rows are perturbed or the numbers drawn for them (keyed by seed, step and block). With
`grape.directions` = K > 1 each of those rows carries K independent tangents (the paper's
"multiple perturbation directions"): J_hat sums K m rank-1 terms, a lower-variance estimate at
K times the tangent work.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import GrapeConfig
from ..rng import keyed_generator
from . import feedback as fb
from .base import MicroBatch, Reduce, no_reduce
from .tangents import Rows


def tangent_rows(mb: MicroBatch, samples: int, directions: int = 1) -> tuple[int, int, Rows]:
    """The tangent rows of micro-batch `mb` when `samples` rows of its mini-batch carry
    tangents (0 = all), each in `directions` independent directions: (k0, k1, rows) such that
    tangents k0..k1-1 of the mini-batch sit on rows `rows` of the micro-batch. Tangent k is
    direction k % directions of global row floor((k // directions) * total / m)."""
    m = min(samples or mb.total, mb.total)
    d = directions
    # Global row floor(j*total/m) >= start  <=>  j >= start*m/total.
    j0 = -(-mb.start * m // mb.total)
    j1 = -(-(mb.start + mb.size) * m // mb.total)
    if m == mb.total and d == 1:
        return j0, j1, slice(0, mb.size)
    return j0 * d, j1 * d, torch.arange(j0 * d, j1 * d) // d * mb.total // m - mb.start


class FeedbackLearner:
    """Tangent draws, J_hat accumulation, the B step and column renormalisation for the
    feedback matrices `B` (global block index -> d_out x n_l parameter) of one stage."""

    def __init__(self, B: dict[int, nn.Parameter], cfg: GrapeConfig, seed: int,
                 optimizer: torch.optim.Optimizer | None, num_hidden: int,
                 reduce: Reduce = no_reduce) -> None:
        self.B = B
        self.routing = cfg.routing
        self.samples = cfg.tangent_samples
        self.directions = cfg.directions
        self.noise_on_device = cfg.tangent_noise == "device"
        self.eps = cfg.eps
        self.seed = seed
        self.optimizer = optimizer
        self.num_hidden = num_hidden  # tangent streams with per-block routing
        self.reduce = reduce
        self._jhat: dict[int, torch.Tensor] = {}
        self._noise_step = -1
        self._noise: dict[int, torch.Tensor] = {}
        self._rows: dict[tuple, Rows] = {}  # index tensors, made once per device and shape

    # -- forward: tangents ------------------------------------------------------------------

    def rows(self, mb: MicroBatch, device: torch.device | None = None
             ) -> tuple[int, int, Rows]:
        """`tangent_rows`, with an index tensor on `device` (cached: no copy per step)."""
        key = (mb.start, mb.size, mb.total, device)
        if key not in self._rows:
            k0, k1, rows = tangent_rows(mb, self.samples, self.directions)
            if isinstance(rows, torch.Tensor) and device is not None:
                rows = rows.to(device)
            self._rows[key] = (k0, k1, rows)
        return self._rows[key]

    def draw(self, i: int, mb: MicroBatch, k0: int, k1: int, shape: tuple[int, ...],
             device: torch.device) -> torch.Tensor | None:
        """Block i's tangent on tangent rows k0..k1-1 of `mb`'s mini-batch (`rows(mb)`; None
        if there are none). Drawn once per mini-batch for all its tangent rows, from a stream
        keyed by (seed, step, block), then sliced: the numbers depend on neither the stage
        layout nor the micro-batching."""
        if k0 == k1:
            return None
        if mb.step != self._noise_step:
            self._noise_step, self._noise = mb.step, {}
        if i not in self._noise:
            m = min(self.samples or mb.total, mb.total) * self.directions
            if self.noise_on_device and device.type == "cuda" and \
                    torch.cuda.is_current_stream_capturing():
                # Inside a CUDA graph: the default generator, whose state the graph advances at
                # each replay (a keyed generator would replay the captured numbers).
                self._noise[i] = torch.randn(m, *shape, device=device)
            else:
                where = device if self.noise_on_device else torch.device("cpu")
                gen = keyed_generator(self.seed, "tangent", mb.step, i, device=where)
                self._noise[i] = torch.randn(m, *shape, generator=gen,
                                             device=where).to(device)
        return self._noise[i][k0:k1]

    def route(self, bundle: torch.Tensor | None, p: torch.Tensor) -> torch.Tensor:
        """Add a block's tangent: a new stream (per-block) or onto the single stream."""
        if bundle is None:
            return p.unsqueeze(0)
        if self.routing == "per_block":
            return torch.cat([bundle, p.unsqueeze(0)])
        return bundle + p.unsqueeze(0)

    def output_tangent_shape(self, mb: MicroBatch) -> tuple[int, int] | None:
        """(streams, rows) of the output tangents of `mb`; None if it has no tangent rows."""
        k0, k1, _ = self.rows(mb)
        if k0 == k1:
            return None
        return (self.num_hidden if self.routing == "per_block" else 1), k1 - k0

    # -- signal: estimate --------------------------------------------------------------------

    def accumulate(self, i: int, output_tangents: torch.Tensor, p: torch.Tensor) -> None:
        """J_hat_i += sum_s g_s p_s^T, with g the output tangents of block i's stream (its
        position among the hidden blocks, or the single shared stream)."""
        k = i if self.routing == "per_block" else 0
        j = fb.jacobian_estimate(output_tangents[k], p)
        if i in self._jhat:
            self._jhat[i].add_(j)
        else:
            self._jhat[i] = j

    def jacobian_estimates(self) -> dict[int, torch.Tensor]:
        """J_hat accumulated over the micro-batches received so far this step."""
        return dict(self._jhat)

    # -- end of mini-batch: the B step -----------------------------------------------------

    def step(self) -> dict[str, torch.Tensor]:
        """One optimiser step on L_align for every B (eq. 6/17), then unit-norm columns.
        Returns the mean column cosine of each block before the step (0-d tensors: reading
        them would stall the host while other stages' work waits to be issued)."""
        if not self.B:
            return {}
        ids = sorted(self.B)
        for i in ids:
            # A replica without tangent rows this step still takes part in the sum.
            if i not in self._jhat:
                self._jhat[i] = torch.zeros_like(self.B[i])
        # Replicas sum their estimates first, so every replica takes the same B step.
        self.reduce([self._jhat[i] for i in ids])
        stats = {}
        for i in ids:
            loss, grad = fb.alignment_loss_grad(self.B[i].data, self._jhat[i], self.eps)
            self.B[i].grad = grad
            stats[f"align_cos/{i}"] = 1.0 - loss
        self.optimizer.step()
        with torch.no_grad():
            for i in ids:
                b = self.B[i]
                b.copy_(fb.normalize_columns(b, self.eps))
                b.grad = None
        self._jhat = {}
        return stats

    def reset(self) -> None:
        self._jhat = {}

    def held_tensors(self) -> list[object]:
        """The estimates and tangents of this mini-batch (see StageRule.held_tensors)."""
        return [dict(self._jhat), dict(self._noise)]
