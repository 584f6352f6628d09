"""A pipeline stage: a contiguous range of blocks, its learning rule and its calibration rule."""

from __future__ import annotations

from dataclasses import dataclass

from ..models import Block
from ..rules import BackpropRule, StageRule


@dataclass
class Stage:
    index: int  # position in the pipeline: how the transport addresses it
    first: int  # global index of the stage's first block
    last: int  # one past its last block
    rule: StageRule
    calibration: BackpropRule | None  # exact BP on the same blocks, its own optimiser

    @property
    def blocks(self) -> list[Block]:
        return self.rule.blocks
