"""The fully connected network of the paper's Table 1: hidden Linear+activation blocks, then a
Linear output block (the "3-layer MLP" is two hidden layers of 1024 and the output layer)."""

from __future__ import annotations

import math
from functools import partial

from torch import nn

from .blocks import Block, BlockFactory, BlockModel
from .layers import activation


def _dense(name: str, d_in: int, d_out: int, act: str | None, flatten: bool) -> Block:
    layers = [nn.Flatten()] if flatten else []
    layers.append(nn.Linear(d_in, d_out))
    if act is not None:
        layers.append(activation(act))
    return Block(name, *layers)


def dense_factories(d_in: int, hidden: list[int], num_classes: int, act: str,
                    flatten_first: bool, prefix: str = "fc") -> list[BlockFactory]:
    """Hidden [Flatten] Linear+activation blocks, then the Linear output block."""
    out: list[BlockFactory] = []
    width = d_in
    for i, w in enumerate(hidden):
        out.append(partial(_dense, f"{prefix}{i + 1}", width, w, act, flatten_first and i == 0))
        width = w
    out.append(partial(_dense, "out", width, num_classes, None, flatten_first and not hidden))
    return out


def build_mlp(
    input_shape: tuple[int, ...], num_classes: int, hidden: list[int], act: str = "relu"
) -> BlockModel:
    """On the meta device; `materialize` builds the blocks a rank holds."""
    return BlockModel(dense_factories(math.prod(input_shape), hidden, num_classes, act, True),
                      input_shape, num_classes)
