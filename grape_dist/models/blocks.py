"""A model is a sequence of blocks; a block is one feedback point of the learning rules.

`h_0 = x`, `h_l = f_l(h_{l-1})`, logits `= h_L`. The direct rules project the output error onto
each block's output `h_l`; inside a block, local backprop is allowed (as in Launay et al. 2020's
macro/micro DFA). The pipeline runtime partitions a model by whole blocks, so a block is also
the unit of placement.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class Block(nn.Sequential):
    """A named run of layers whose output is a feedback point."""

    def __init__(self, name: str, *layers: nn.Module) -> None:
        super().__init__(*layers)
        self.name = name
        self.out_shape: tuple[int, ...] = ()  # per-sample output shape, set by BlockModel

    @property
    def out_features(self) -> int:
        """n_l: the flattened size of the block's output."""
        return math.prod(self.out_shape)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, out_shape={self.out_shape}"


class BlockModel(nn.Module):
    """A plain sequence of blocks; parallelism and learning rules are applied from outside."""

    def __init__(self, blocks: list[Block], input_shape: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        # Record each block's output shape once, so that feedback matrices and pipeline buffers
        # can be sized without running data through the model again.
        with torch.no_grad():
            h = torch.zeros(1, *input_shape)
            for block in blocks:
                h = block(h)
                block.out_shape = tuple(h.shape[1:])
        if blocks[-1].out_shape != (num_classes,):
            raise ValueError(
                f"last block must output {num_classes} logits, got {blocks[-1].out_shape}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def __len__(self) -> int:
        return len(self.blocks)
