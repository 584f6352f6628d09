"""Split a model's blocks into contiguous pipeline stages."""

from __future__ import annotations

import math
import time

import torch

from ..models import BlockModel


class PartitionError(ValueError):
    pass


def balanced_bounds(costs: list[float], stages: int) -> list[tuple[int, int]]:
    """Contiguous (first, last) ranges of `costs` into `stages` parts minimising the largest
    part's total (exact dynamic programme; block counts are small)."""
    n = len(costs)
    if stages < 1:
        raise PartitionError(f"need at least one stage, got {stages}")
    if stages > n:
        raise PartitionError(
            f"{stages} pipeline stages but the model has only {n} blocks; use at most {n} "
            "stages (pipeline.pp)")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)
    # best[k][i]: minimal max-part cost for the first i blocks in k parts; cut[k][i]: last cut.
    best = [[math.inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for k in range(1, stages + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                v = max(best[k - 1][j], prefix[i] - prefix[j])
                if v < best[k][i] - 1e-12:
                    best[k][i], cut[k][i] = v, j
    bounds, i = [], n
    for k in range(stages, 0, -1):
        j = cut[k][i]
        bounds.append((j, i))
        i = j
    return bounds[::-1]


def explicit_bounds(sizes: list[int], num_blocks: int, stages: int) -> list[tuple[int, int]]:
    """Stage bounds from a list of blocks-per-stage (the config override)."""
    if len(sizes) != stages:
        raise PartitionError(f"pipeline.stage_blocks has {len(sizes)} entries for {stages} stages")
    if any(s < 1 for s in sizes) or sum(sizes) != num_blocks:
        raise PartitionError(
            f"pipeline.stage_blocks={sizes} must be positive block counts summing to the "
            f"model's {num_blocks} blocks")
    bounds, start = [], 0
    for s in sizes:
        bounds.append((start, start + s))
        start += s
    return bounds


def block_costs(model: BlockModel, how: str, batch: int = 32, repeats: int = 3) -> list[float]:
    """Per-block cost: parameter count (`params`) or measured forward time (`time`)."""
    if how == "params":
        return [float(sum(p.numel() for p in b.parameters())) or 1.0 for b in model.blocks]
    if how == "time":
        costs = []
        with torch.no_grad():
            h = torch.zeros(batch, *model.input_shape, device=next(model.parameters()).device)
            for block in model.blocks:
                block(h)  # warm-up
                t0 = time.perf_counter()
                for _ in range(repeats):
                    out = block(h)
                costs.append((time.perf_counter() - t0) / repeats)
                h = out
        return costs
    raise PartitionError(f"unknown balance {how!r}; allowed: params, time")


def partition(model: BlockModel, stages: int, balance: str = "params",
              stage_blocks: list[int] | None = None,
              costs: list[float] | None = None) -> list[tuple[int, int]]:
    """Explicit `stage_blocks`, else balanced by `costs` (default: `block_costs(balance)`).
    Pass the same `costs` on every rank when they are measured (they differ per rank)."""
    if stage_blocks:
        return explicit_bounds(stage_blocks, len(model.blocks), stages)
    return balanced_bounds(costs if costs is not None else block_costs(model, balance), stages)
