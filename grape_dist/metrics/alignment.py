"""Per-block alignment of the feedback matrices, measured against exact derivatives, computed
on the ranks that hold the blocks (only scalars are gathered).

On a probe batch, for every feedback point l (a hidden block's output, or with layer feedback
a weight layer's point, rules/points.py) with a feedback matrix B_l:
- `grad_cos`: mean over samples of cos(B_l^T e, dL/dh_l), the direct rule's update signal
  against the true gradient from a real backward pass through the pipeline (which does not
  step);
- `jac_cos`: cos_F(B_l, J_l) with J_l = sum_s d y_hat_s / d h_l,s, the exact batch-summed
  Jacobian (one more backward pass per output unit; only for classifiers with at most
  `train.jacobian_metric_max_outputs` outputs);

A language model's signal is the error at the head's input, per token (Launay et al. 2020):
`grad_cos` is then the mean over tokens, and its B is shared over positions.
- `jhat_cos`: cos_F(B_l, J_hat_l) with a rank-1 JVP estimate on the same batch (one probe
  tangent per block, keyed by (seed, block), carried to the output with the forward pass): what
  GrAPE's alignment step sees.

The derivatives come from the runtime's probe schedule (runtime/probe.py: a forward with graphs
and the probe tangents, the signal broadcast, a backward that does not step); this module holds
only the cosines. Replica 0 computes them; all ranks get the result.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..rules.feedback import feedback_columns, frobenius_cosine, jacobian_estimate, project
from ..runtime.probe import PointDerivatives

if TYPE_CHECKING:
    from ..runtime.engine import PipelineEngine


def probe_alignment(engine: PipelineEngine, x: torch.Tensor, y: torch.Tensor, seed: int,
                    max_outputs: int) -> dict[str, dict[str, float]]:
    """{feedback point: {"grad_cos", "jhat_cos"[, "jac_cos"]}} on the probe rows `x`, `y`, on
    every rank (collective); empty for rules without feedback matrices. `max_outputs`: the
    largest classifier whose exact Jacobian is measured (0: never)."""
    return engine.probe(x, y, seed, point_alignment, max_outputs)


def point_alignment(d: PointDerivatives) -> dict[str, float]:
    """The cosines of one point's feedback matrix against its exact derivatives."""
    rows = d.error.shape[0]
    # Per output position: one row per sample, or per token with position-shared B.
    grad = d.grad.reshape(rows, -1)
    # (A channel-shared B's signal is repeated over each channel's positions.)
    proj = project(d.error, d.feedback, d.grad.shape) if d.positions == 1 \
        else d.error @ d.feedback
    cos = F.cosine_similarity(proj.reshape(rows, -1), grad, dim=1, eps=1e-12)
    live = grad.norm(dim=1) > 0
    row = {"grad_cos": float(cos[live].mean()) if live.any() else 0.0}
    if d.jacobian is not None:
        row["jac_cos"] = frobenius_cosine(
            d.feedback, feedback_columns(d.jacobian, d.feedback.shape[1]))
    row["jhat_cos"] = frobenius_cosine(
        d.feedback, feedback_columns(jacobian_estimate(d.output_tangent, d.tangent),
                                     d.feedback.shape[1]))
    return row
