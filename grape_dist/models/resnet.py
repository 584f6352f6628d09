"""He et al.'s CIFAR ResNets (ResNet-20, -56, ... depth 6n + 2) as block sequences (Table 3).

Blocks: `stem` (3x3 conv 16, BatchNorm, ReLU), then 3n residual blocks (one feedback point
each: 3 stages of n basic blocks at widths 16, 32, 64, the first of stages 2 and 3 with stride
2), then `head` (global average pool, Linear). A basic block is
`ReLU(BN(conv(ReLU(BN(conv(x))))) + shortcut(x))` with He et al.'s option A shortcut for the
CIFAR models: identity, or when the shape changes, subsampling by 2 and zero channels (no
parameters). Convolutions have no bias (BatchNorm follows).

Tangents through these blocks are written in closed form in `rules/tangents.py`; BatchNorm's
semantics there: see docs/resnet.md.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import Block, BlockFactory, BlockModel


def _conv(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    conv = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


class ShortcutA(nn.Module):
    """He et al.'s option A: x[:, :, ::2, ::2] padded with zero channels (linear, no
    parameters)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.stride, self.pad = stride, c_out - c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[..., ::self.stride, ::self.stride]
        if self.pad:
            # Pad the channel axis (third from the end), also under an extra leading axis.
            x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x


class BasicBlock(nn.Module):
    """ReLU(BN(conv(ReLU(BN(conv(x))))) + shortcut(x))."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv(c_in, c_out, stride), nn.BatchNorm2d(c_out)
        self.conv2, self.bn2 = _conv(c_out, c_out), nn.BatchNorm2d(c_out)
        self.shortcut = ShortcutA(c_in, c_out, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))

    def taps(self, out_shape: tuple[int, ...]) -> list[tuple[str, tuple[int, ...]]]:
        """Feedback points at every weight layer (`feedback.points: layer`): each conv's
        BatchNorm/ReLU output, (name, per-sample shape); the last is the block's output."""
        return [("conv1", out_shape), ("conv2", out_shape)]


def _stem(c_in: int) -> Block:
    return Block("stem", _conv(c_in, 16), nn.BatchNorm2d(16), nn.ReLU())


def _basic(name: str, c_in: int, c_out: int, stride: int) -> Block:
    return Block(name, BasicBlock(c_in, c_out, stride))


def _head(c_in: int, num_classes: int) -> Block:
    return Block("head", nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, num_classes))


def build_resnet(input_shape: tuple[int, ...], num_classes: int, depth: int = 20) -> BlockModel:
    """On the meta device: stem, 3n residual blocks (depth = 6n + 2), head."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"a CIFAR ResNet has depth 6n + 2 (20, 32, 44, 56, 110), got {depth}")
    n = (depth - 2) // 6
    blocks: list[BlockFactory] = [partial(_stem, input_shape[0])]
    c_in = 16
    for stage, width in enumerate((16, 32, 64)):
        for j in range(n):
            stride = 2 if stage > 0 and j == 0 else 1
            blocks.append(partial(_basic, f"res{stage + 1}.{j}", c_in, width, stride))
            c_in = width
    blocks.append(partial(_head, c_in, num_classes))
    return BlockModel(blocks, input_shape, num_classes)
