"""The LeNet-5-style CNN of the paper's Table 1: two conv stages (conv 5x5, activation, 2x2 max
pool), then fully connected blocks and the output. Each conv stage and each FC layer is a block.
On 28x28 inputs the first conv pads by 2, so MNIST and CIFAR both reach 5x5 after stage two."""

from __future__ import annotations

from torch import nn

from .blocks import Block, BlockModel
from .layers import activation


def build_lenet(
    input_shape: tuple[int, int, int],
    num_classes: int,
    channels: list[int],
    hidden: list[int],
    act: str = "relu",
) -> BlockModel:
    c_in, h, _ = input_shape
    pad = 2 if h == 28 else 0
    c1, c2 = channels
    blocks = [
        Block("conv1", nn.Conv2d(c_in, c1, 5, padding=pad), activation(act), nn.MaxPool2d(2)),
        Block("conv2", nn.Conv2d(c1, c2, 5), activation(act), nn.MaxPool2d(2)),
    ]
    side = ((h + 2 * pad - 4) // 2 - 4) // 2
    width = c2 * side * side
    for i, out in enumerate(hidden):
        pre = [nn.Flatten()] if i == 0 else []
        blocks.append(Block(f"fc{i + 1}", *pre, nn.Linear(width, out), activation(act)))
        width = out
    pre = [nn.Flatten()] if not hidden else []
    blocks.append(Block("out", *pre, nn.Linear(width, num_classes)))
    return BlockModel(blocks, input_shape, num_classes)
