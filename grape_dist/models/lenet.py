"""The LeNet-5-style CNN of the paper's Table 1: two conv stages (conv 5x5, activation, 2x2 max
pool), then fully connected blocks and the output. Each conv stage and each FC layer is a block.
On 28x28 inputs the first conv pads by 2, so MNIST and CIFAR both reach 5x5 after stage two."""

from __future__ import annotations

from functools import partial

from torch import nn

from .blocks import Block, BlockModel
from .layers import activation
from .mlp import dense_factories


def _conv(name: str, c_in: int, c_out: int, pad: int, act: str) -> Block:
    return Block(name, nn.Conv2d(c_in, c_out, 5, padding=pad), activation(act), nn.MaxPool2d(2))


def build_lenet(
    input_shape: tuple[int, int, int],
    num_classes: int,
    channels: list[int],
    hidden: list[int],
    act: str = "relu",
) -> BlockModel:
    """On the meta device; `materialize` builds the blocks a rank holds."""
    c_in, h, _ = input_shape
    pad = 2 if h == 28 else 0
    c1, c2 = channels
    side = ((h + 2 * pad - 4) // 2 - 4) // 2
    blocks = [partial(_conv, "conv1", c_in, c1, pad, act), partial(_conv, "conv2", c1, c2, 0, act)]
    blocks += dense_factories(c2 * side * side, hidden, num_classes, act, flatten_first=True)
    return BlockModel(blocks, input_shape, num_classes)
