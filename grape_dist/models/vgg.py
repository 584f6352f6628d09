"""The CIFAR VGG-16 (paper Table 2) as 16 blocks, one per weight layer.

Configuration D of Simonyan & Zisserman with BatchNorm, in its usual CIFAR form: 13 conv 3x3
(pad 1, no bias) + BatchNorm + ReLU at widths 64, 64 | 128, 128 | 256 x3 | 512 x3 | 512 x3,
a 2x2 max pool after conv 2, 4, 7, 10 and 13 (32x32 -> 1x1), then the classifier
flatten, dropout, Linear 512 -> 512, ReLU | dropout, Linear 512 -> 512, ReLU | Linear -> classes.

Each conv layer (with its BatchNorm, ReLU and pool) and each Linear is one block: 16 feedback
points. BatchNorm's tangent holds the batch statistics fixed, as in the ResNets
(`rules/tangents.batch_norm_tangent`, docs/resnet.md). Dropout is `KeyedDropout`
(`models/dropout.py`); `width` multiplies every channel count and hidden width.
"""

from __future__ import annotations

from functools import partial

from torch import nn

from .alexnet import classifier_factories, scaled
from .blocks import Block, BlockFactory, BlockModel

# Channels per conv layer; a pool follows the last layer of each group.
GROUPS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
HIDDEN = (512, 512)


def _conv(name: str, c_in: int, c_out: int, pool: bool) -> Block:
    conv = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    layers: list[nn.Module] = [conv, nn.BatchNorm2d(c_out), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return Block(name, *layers)


def build_vgg16(input_shape: tuple[int, ...], num_classes: int, width: float = 1.0,
                dropout: float = 0.5) -> BlockModel:
    """On the meta device: 13 conv blocks, 2 hidden Linear blocks, the head (16 blocks)."""
    c_in, h, w = input_shape
    if h < 32 or w < 32:
        raise ValueError(f"VGG-16 pools 5 times by 2: it needs inputs of at least 32x32, got "
                         f"{input_shape[1:]}")
    blocks: list[BlockFactory] = []
    for group in GROUPS:
        for j, c_out in enumerate(scaled(group, width)):
            pool = j == len(group) - 1
            blocks.append(partial(_conv, f"conv{len(blocks) + 1}", c_in, c_out, pool))
            c_in = c_out
        h, w = h // 2, w // 2
    blocks += classifier_factories(c_in * h * w, scaled(HIDDEN, width), num_classes, dropout)
    return BlockModel(blocks, input_shape, num_classes)
