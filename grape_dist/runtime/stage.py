"""A pipeline stage: a contiguous range of blocks, its learning rule and its calibration rule."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import CALIBRATED_RULES, Config
from ..models import BlockModel
from ..rules import BackpropRule, StageRule, build_calibration_rule, build_stage_rule


@dataclass
class Stage:
    index: int
    first: int  # global index of the stage's first block
    last: int  # one past its last block
    rule: StageRule
    calibration: BackpropRule | None  # exact BP on the same blocks, own optimiser


def build_stages(cfg: Config, model: BlockModel, bounds: list[tuple[int, int]],
                 only: int | None = None) -> list[Stage]:
    """One Stage per (first, last) range; the ranges must tile the model's blocks in order.
    `only`: build just that stage (a rank of the distributed pipeline)."""
    n = len(model.blocks)
    if not bounds or bounds[0][0] != 0 or bounds[-1][1] != n or any(
        a[1] != b[0] or a[0] >= a[1] for a, b in zip(bounds, bounds[1:] + [(n, n + 1)])
    ):
        raise ValueError(f"stage bounds {bounds} do not tile blocks 0..{n - 1} in order")
    calibrate = cfg.rule in CALIBRATED_RULES and cfg.calibration.every_epochs > 0
    return [
        Stage(s, a, b, build_stage_rule(cfg, model, a, b),
              build_calibration_rule(cfg, model, a, b) if calibrate else None)
        for s, (a, b) in enumerate(bounds)
        if only is None or s == only
    ]
