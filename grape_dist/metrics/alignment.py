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

The probe runs like a BP step: a forward through the stages (with graphs and the probe
tangents), a broadcast of the error and output tangents, then the gradients of the loss (and of
each output unit) passed back stage by stage. Replica 0 computes it; all ranks get the result.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..models.dropout import dropout_rows
from ..rng import keyed_generator
from ..rules.direct import DirectFeedbackRule
from ..rules.feedback import feedback_columns, frobenius_cosine, jacobian_estimate, project
from ..rules.points import tap_outputs, tapped_forward
from ..rules.tangents import block_forward
from ..runtime.transport import message_key

if TYPE_CHECKING:
    from ..runtime.engine import PipelineEngine


def probe_alignment(engine: PipelineEngine, x: torch.Tensor, y: torch.Tensor, seed: int,
                    max_outputs: int) -> dict[str, dict[str, float]]:
    local: dict[str, dict[str, float]] = {}
    # The rule is the same on every rank, so a replica's ranks agree on taking part; the other
    # replicas hold the same weights.
    if engine.replica == 0 and isinstance(engine.stages[0].rule, DirectFeedbackRule):
        # The probe runs in train mode like a step (BatchNorm on the probe batch's statistics)
        # but must not change the model: its running statistics are put back afterwards.
        buffers = [(b, b.clone()) for stage in engine.stages for block in stage.blocks
                   for b in block.buffers()]
        try:
            # Fixed dropout masks (keyed by the probe's seed): the probe is deterministic and
            # the same on any layout.
            with dropout_rows(seed, 0, len(y), len(y), stream="probe"):
                local = _probe(engine, x, y, seed, max_outputs)
        finally:
            for b, saved in buffers:
                b.copy_(saved)
    out = engine.merge_stats(local)
    if not out:
        return out
    order = [pt.name for pt in engine.stages[0].rule.all_points]
    return dict(sorted(out.items(), key=lambda kv: order.index(kv[0])))


@torch.no_grad()
def _probe(engine: PipelineEngine, x: torch.Tensor, y: torch.Tensor, seed: int,
           max_outputs: int) -> dict[str, dict[str, float]]:
    transport, device = engine.transport, engine.device
    last = engine.layout.num_stages - 1
    spec = engine.model.signal_spec
    num_blocks, n = len(engine.model.blocks), len(y)
    points = engine.stages[0].rule.all_points
    # The signal: per output position (a language model's tokens), `c` values wide (the logits'
    # error, or for a language model the error at the head's input, Launay et al. 2020).
    c, rows = spec.signal_width, n * spec.positions
    x, y = x.to(device), y.to(device)
    # Forward: block outputs with their graphs, and one probe tangent stream per hidden block.
    saved = {}
    head_in = None
    for stage in engine.stages:
        s = stage.index
        h, t = (x, None) if s == 0 else transport.recv(s - 1, s, message_key("probe/fwd", n))
        x_in = h.detach().requires_grad_(s > 0)
        h, outs = x_in, []
        with torch.enable_grad():
            for offset, block in enumerate(stage.blocks):
                i = stage.first + offset
                if spec.at_head_input and i == num_blocks - 1:
                    head_in = h  # the tangents and the signal stop here
                    h = block(h)
                    continue
                here = [pt for pt in points if pt.block == i]
                drawn = []

                def inject(j: int, u: torch.Tensor | None, here=here, drawn=drawn):
                    # One probe tangent stream per point, keyed by (seed, point).
                    gen = keyed_generator(seed, "probe", here[j].index)
                    p = torch.randn(n, *here[j].shape, generator=gen).to(device)
                    drawn.append(p)
                    return p.unsqueeze(0) if u is None else torch.cat([u, p.unsqueeze(0)])
                if here and here[0].tap is not None:
                    # Layer points: the exact gradients at the points need the whole block's
                    # graph; the tangents come from the rules' own forward.
                    h_in = h
                    h, values = tap_outputs(block, h_in)
                    _, t, _ = tapped_forward(block, h_in.detach(), t, None, inject)
                else:
                    h, t = block_forward(block, h, t)
                    values = [h]
                    if here:
                        t = inject(0, t)
                outs += [(pt.index, v, p) for pt, v, p in zip(here, values, drawn)]
        saved[s] = (x_in, outs, h, t)
        if s != last:
            transport.send([h.detach(), t], s, s + 1, message_key("probe/fwd", n))
    # The error of the mean loss and the output tangents, from the last stage to every stage.
    k = len(points)
    if engine.stages[-1].index == last:
        x_last, outs_last, logits, t = saved[last]
        flat = logits.detach().reshape(rows, -1)
        e = (F.softmax(flat, 1) - F.one_hot(y.reshape(-1), flat.shape[1]).to(flat.dtype)) / rows
        if spec.at_head_input:
            # The error at the head's input: the head's exact backward; the probe's backward
            # then starts there.
            with torch.enable_grad():
                e = torch.autograd.grad(logits, head_in, e.reshape(logits.shape))[0]
            saved[last] = (x_last, outs_last, head_in, t)
        packet = torch.cat([e.reshape(-1), t.reshape(-1)]).double()
    else:
        packet = torch.empty(rows * c * (1 + k), dtype=torch.float64, device=device)
    transport.broadcast(packet, last).wait()
    dtype = torch.get_default_dtype()
    e = packet[:rows * c].view(rows, c).to(dtype)
    g = packet[rows * c:].view(k, n, *spec.tangent_tail()).to(dtype)
    # Backward without stepping: the loss gradient (grad output e) and, for the exact Jacobian,
    # each output unit summed over the batch (grad output one-hot in that unit; classifiers).
    units = c if c <= max_outputs and spec.positions == 1 else 0
    out: dict[str, dict[str, float]] = {}
    for stage in reversed(engine.stages):
        s = stage.index
        x_in, outs, y_out, _ = saved[s]
        if s == last:
            eye = torch.eye(c, dtype=dtype, device=device)
            grads_out = [e.reshape(y_out.shape), *eye[:units, None, :].expand(units, n, c)]
        else:
            grads_out = transport.recv(s + 1, s, message_key("probe/back", n))[0]
        inputs = [h for _, h, _ in outs] + ([x_in] if s > 0 else [])
        true_grads, jac, back = None, [[] for _ in outs], []
        with torch.enable_grad():
            for r, go in enumerate(grads_out):
                gs = torch.autograd.grad(y_out, inputs, go, retain_graph=r < len(grads_out) - 1,
                                         allow_unused=True)
                if r == 0:
                    true_grads = gs
                else:
                    for b in range(len(outs)):
                        jac[b].append(gs[b].reshape(n, -1).sum(0))
                if s > 0:
                    back.append(gs[-1])
        if s > 0:
            transport.send([torch.stack(back)], s, s - 1, message_key("probe/back", n))
        feedback = stage.rule.feedback_matrices()
        for b, (i, _, p) in enumerate(outs):
            bmat = feedback[i]
            # Per output position: one row per sample, or per token with position-shared B.
            grad = true_grads[b].reshape(rows, -1)
            # (A channel-shared B's signal is repeated over each channel's positions.)
            proj = project(e, bmat, true_grads[b].shape) if spec.positions == 1 else e @ bmat
            cos = F.cosine_similarity(proj.reshape(rows, -1), grad, dim=1, eps=1e-12)
            live = grad.norm(dim=1) > 0
            row = {"grad_cos": float(cos[live].mean()) if live.any() else 0.0}
            if units:
                row["jac_cos"] = frobenius_cosine(
                    bmat, feedback_columns(torch.stack(jac[b]), bmat.shape[1]))
            row["jhat_cos"] = frobenius_cosine(
                bmat, feedback_columns(jacobian_estimate(g[i], p), bmat.shape[1]))
            out[points[i].name] = row
    transport.flush()
    transport.check_idle("end of the alignment probe")
    return out
