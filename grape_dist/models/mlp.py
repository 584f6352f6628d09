"""The fully connected network of the paper's Table 1: hidden Linear+activation blocks, then a
Linear output block (the "3-layer MLP" is two hidden layers of 1024 and the output layer)."""

from __future__ import annotations

import math

from torch import nn

from .blocks import Block, BlockModel
from .layers import activation


def build_mlp(
    input_shape: tuple[int, ...], num_classes: int, hidden: list[int], act: str = "relu"
) -> BlockModel:
    blocks = []
    width = math.prod(input_shape)
    for i, out in enumerate(hidden):
        pre = [nn.Flatten()] if i == 0 else []
        blocks.append(Block(f"fc{i + 1}", *pre, nn.Linear(width, out), activation(act)))
        width = out
    pre = [nn.Flatten()] if not hidden else []
    blocks.append(Block("out", *pre, nn.Linear(width, num_classes)))
    return BlockModel(blocks, input_shape, num_classes)
