"""Per-block alignment of the feedback matrices, measured against exact derivatives.

On a probe batch, for every hidden block l with a feedback matrix B_l:
- `grad_cos`: mean over samples of cos(B_l^T e, dL/dh_l), the direct rule's update signal
  against the true gradient from a real backward pass (e is the error of the mean loss);
- `jac_cos`: cos_F(B_l, J_l) with J_l = sum_s d y_hat_s / d h_l,s, the exact batch-summed
  Jacobian (one reverse pass per output unit);
- `jhat_cos`: cos_F(B_l, J_hat_l) with the rank-1 JVP estimate on the same batch (activation-space
  tangents), what GrAPE's alignment step sees.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models import BlockModel
from ..rng import keyed_generator
from ..rules.feedback import frobenius_cosine, jacobian_estimate
from ..rules.tangents import push_tangents


def alignment_metrics(
    model: BlockModel, feedback: dict[int, torch.Tensor], x: torch.Tensor, y: torch.Tensor,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    if not feedback:
        return {}
    blocks = list(model.blocks)
    with torch.enable_grad():
        hs = []
        h = x
        for block in blocks:
            h = block(h)
            h.retain_grad()
            hs.append(h)
        logits = h
        loss = F.cross_entropy(logits, y)
        # Exact batch-summed Jacobians first (they need the graph), then the loss gradient.
        ids = sorted(feedback)
        jac = {i: torch.zeros(logits.shape[1], blocks[i].out_features, device=x.device)
               for i in ids}
        for c in range(logits.shape[1]):
            grads = torch.autograd.grad(logits[:, c].sum(), [hs[i] for i in ids],
                                        retain_graph=True)
            for i, g in zip(ids, grads):
                jac[i][c] = g.reshape(g.shape[0], -1).sum(0)
        grads = torch.autograd.grad(loss, [hs[i] for i in ids])
    with torch.no_grad():
        e = (F.softmax(logits, 1) - F.one_hot(y, logits.shape[1]).to(logits.dtype)) / len(y)
    out = {}
    for i, true_grad in zip(ids, grads):
        b = feedback[i]
        proj = e @ b
        g = true_grad.reshape(len(y), -1)
        cos = F.cosine_similarity(proj, g, dim=1, eps=1e-12)
        live = g.norm(dim=1) > 0
        p = torch.randn(hs[i].shape, generator=keyed_generator(seed, "probe", i)).to(x.device)
        gt = push_tangents(blocks[i + 1:], hs[i].detach(), p.unsqueeze(0))[0]
        out[blocks[i].name] = {
            "grad_cos": float(cos[live].mean()) if live.any() else 0.0,
            "jac_cos": frobenius_cosine(b, jac[i]),
            "jhat_cos": frobenius_cosine(b, jacobian_estimate(gt, p)),
        }
    return out
