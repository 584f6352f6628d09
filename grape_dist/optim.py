"""Optimisers built from `OptimConfig`."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from .config import OptimConfig


def build_optimizer(params: Iterable[torch.Tensor], cfg: OptimConfig) -> torch.optim.Optimizer:
    params = list(params)
    fused = cfg.fused or None  # None: torch's default (foreach where it applies)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay, fused=fused)
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                                fused=fused)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas,
                                 weight_decay=cfg.weight_decay, fused=fused)
    raise ValueError(f"unknown optimizer {cfg.name!r}; allowed: sgd, adam, adamw")


def state_per_parameter(cfg: OptimConfig) -> int:
    """Numbers of optimiser state an optimiser keeps per parameter: Adam's two moments, SGD's
    momentum buffer (none without momentum)."""
    if cfg.name in ("adam", "adamw"):
        return 2
    return 1 if cfg.momentum else 0


def scheduled_lr(cfg: OptimConfig, epoch: int, epochs: int) -> float:
    """Learning rate for 1-based `epoch` of `epochs` under `cfg.schedule`."""
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / epochs))
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** sum(epoch > m for m in cfg.milestones)
    return cfg.lr


def warmup_factor(cfg: OptimConfig, step: int) -> float:
    """The share of the scheduled learning rate that 0-based training `step` uses: (step + 1)
    / warmup_steps during the warm-up, then 1."""
    if step >= cfg.warmup_steps:
        return 1.0
    return (step + 1) / cfg.warmup_steps


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
