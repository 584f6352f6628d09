"""Feedback matrices B_l (d_out x n_l) and GrAPE's alignment step on them (eq. 6, App. C).

Conventions: the output error of a mini-batch is `e` (batch x d_out); block l receives
`delta_h_l = e @ B_l` (i.e. B_l^T e per sample), reshaped to the block's output shape.

Channel-shared feedback (`feedback.conv: channel`) for a conv block with output (C, H, W): B_l
is d_out x C and the projected signal is the same at every position of a channel. Its target
is then J_l P, P (CHW x C) summing positions per channel: the direction of the least-squares
channel-shared approximation of J_l^T e. A tangent drawn per channel and repeated over positions
(p = P q) gives g q^T = J_l P q q^T, unbiased for J_l P with the variance of a C-dimensional
draw rather than a CHW-dimensional one.
"""

from __future__ import annotations

import math

import torch


def init_feedback(
    d_out: int, n: int, generator: torch.Generator, kind: str = "gaussian", normalize: bool = True
) -> torch.Tensor:
    """A random feedback matrix; unit-norm columns when `normalize` (GrAPE keeps them so)."""
    if kind == "gaussian":
        b = torch.randn(d_out, n, generator=generator)
    elif kind == "uniform":
        b = torch.rand(d_out, n, generator=generator) * 2 - 1
    else:
        raise ValueError(f"unknown feedback init {kind!r}; allowed: gaussian, uniform")
    if normalize:
        b = normalize_columns(b)
    else:
        b = b / d_out**0.5
    return b


def normalize_columns(b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """B[:, k] <- B[:, k] / (||B[:, k]|| + eps)  (paper section 3.3)."""
    return b / (b.norm(dim=0, keepdim=True) + eps)


def alignment_loss_grad(b: torch.Tensor, j: torch.Tensor, eps: float = 1e-8):
    """L_align = 1 - mean_k cos(b_k, j_k) and its gradient in closed form (eq. 17).

    d/db_k [1 - cos(b_k, j_k)] / n = -(1/n) [ j_k / (|b_k||j_k|) - (b_k.j_k) b_k / (|b_k|^3 |j_k|) ]
    Columns of J that are zero (no tangent reached them) get no gradient.
    """
    n = b.shape[1]
    bn = b.norm(dim=0).clamp_min(eps)
    jn = j.norm(dim=0)
    live = jn > eps
    jn = jn.clamp_min(eps)
    dot = (b * j).sum(0)
    cos = dot / (bn * jn)
    grad = -(j / (bn * jn) - dot * b / (bn**3 * jn)) / n
    grad = grad * live
    loss = 1 - (cos * live).sum() / n
    return loss, grad


def frobenius_cosine(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-12) -> float:
    """cos_F(A, B) = <A, B>_F / (||A||_F ||B||_F)  (eq. 3)."""
    return float((a * b).sum() / (a.norm() * b.norm() + eps))


def project(src: torch.Tensor, b: torch.Tensor, shape: torch.Size | tuple[int, ...]
            ) -> torch.Tensor:
    """`src @ B` laid out as the block output `shape` (batch first); with channel-shared B (fewer
    columns than the output has values per sample) each channel's value is repeated over its
    positions."""
    d = src @ b
    if d.numel() == math.prod(shape):
        return d.reshape(shape)
    return d.reshape(shape[0], shape[1], *[1] * (len(shape) - 2)).expand(shape)


def feedback_columns(j: torch.Tensor, columns: int) -> torch.Tensor:
    """A Jacobian (d_out x n_l) in the form of a feedback matrix with `columns` columns:
    itself, or for channel-shared feedback its columns summed over each channel's positions
    (J_l P)."""
    if j.shape[1] == columns:
        return j
    return j.reshape(j.shape[0], columns, -1).sum(-1)


def jacobian_estimate(g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """J_hat = sum over samples of g_s p_s^T: (m x d_out), (m x ...) -> d_out x n.

    With feedback shared over positions (a language model's tokens), g is (m x T x d_out) and
    p (m x T x n): every (sample, position) pair is one more term of the sum. Either way the
    rows of g (all but its last axis) are the terms, and p is cut into as many rows."""
    g = g.reshape(-1, g.shape[-1])
    return g.T @ p.reshape(g.shape[0], -1)
