"""Split a model's blocks into contiguous pipeline stages."""

from __future__ import annotations

import copy
import math
import time

import torch

from ..config import CALIBRATED_RULES, Config
from ..models import BlockModel
from ..optim import state_per_parameter
from .layout import LayoutError, check_stage_blocks


def balanced_bounds(costs: list[float], stages: int) -> list[tuple[int, int]]:
    """Contiguous (first, last) ranges of `costs` into `stages` parts minimising the largest
    part's total (exact dynamic programme; block counts are small)."""
    n = len(costs)
    if not 1 <= stages <= n:
        raise LayoutError(f"cannot split {n} blocks into {stages} stages")
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
    """Stage bounds from a list of blocks-per-stage (the `pipeline.stage_blocks` override)."""
    check_stage_blocks(sizes, num_blocks, stages)
    bounds, start = [], 0
    for s in sizes:
        bounds.append((start, start + s))
        start += s
    return bounds


def parameter_costs(model: BlockModel) -> list[float]:
    """Parameters per block, read from the (meta) model: no block needs to be materialised."""
    return [float(sum(p.numel() for p in b.parameters())) or 1.0 for b in model.blocks]


def held_costs(cfg: Config, model: BlockModel) -> list[float]:
    """Numbers a stage holds for each block, read from the (meta) model and the config: its
    weights with their optimiser state (and the calibration optimiser's), the feedback
    matrices of its points with theirs (GrAPE's B optimiser), PEPITA's input projection."""
    per_weight = 1 + state_per_parameter(cfg.optim)
    c = cfg.calibration
    if cfg.rule in CALIBRATED_RULES and c.every_epochs > 0 and c.form == "paper":
        per_weight += state_per_parameter(c.optim)
    costs = [float(per_weight * n) for n in parameter_costs(model)]
    if cfg.rule in ("dfa", "drtp", "grape"):
        per_b = 1 + (state_per_parameter(cfg.grape.b_optim) if cfg.rule == "grape" else 0)
        per_channel = cfg.feedback.conv == "channel"
        for pt in model.feedback_points(layer=cfg.feedback.points == "layer"):
            costs[pt.block] += per_b * model.signal_spec.signal_width * \
                model.feedback_width(pt, per_channel)
    if cfg.rule == "pepita":
        costs[0] += math.prod(model.input_shape) * model.num_classes
    return costs


def measured_costs(model: BlockModel, seed: int, device: torch.device | str = "cpu",
                   batch: int = 32, repeats: int = 3) -> list[float]:
    """Forward seconds per block on `batch` rows of the model's input dtype (token ids 0 for a
    language model). Every block is a throwaway copy, built one at a time: measuring never
    holds the whole model, and never touches the real blocks' state (BatchNorm's running
    statistics)."""
    costs = []
    with torch.no_grad():
        h = torch.zeros(batch, *model.input_shape, device=device,
                        dtype=model.input_dtype or torch.get_default_dtype())
        for i in range(len(model.blocks)):
            block = copy.deepcopy(model.blocks[i]) if model.is_materialized(i) else \
                model.build_block(i, seed).to(device)
            block(h)  # warm-up
            t0 = time.perf_counter()
            for _ in range(repeats):
                out = block(h)
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize(device)
            costs.append((time.perf_counter() - t0) / repeats)
            h = out
    return costs


def partition(model: BlockModel, stages: int, stage_blocks: list[int] | None = None,
              costs: list[float] | None = None) -> list[tuple[int, int]]:
    """Explicit `stage_blocks`, else balanced by `costs` (default: parameter counts). Pass the
    same `costs` on every rank when they are measured (measurements differ per rank)."""
    if stage_blocks:
        return explicit_bounds(stage_blocks, len(model.blocks), stages)
    return balanced_bounds(costs if costs is not None else parameter_costs(model), stages)
