"""The CIFAR AlexNet of the DFA literature (paper Table 2) as 8 blocks, one per weight layer.

torchvision's AlexNet (the one BioTorch wraps) needs inputs of at least 63x63; the CIFAR variant
keeps its layer sequence and widths with small-image convolutions (docs/convnets.md):

    conv1  conv 5x5, 64, pad 2   ReLU  max pool 3/2     32 -> 15
    conv2  conv 5x5, 192, pad 2  ReLU  max pool 3/2     15 -> 7
    conv3  conv 3x3, 384, pad 1  ReLU
    conv4  conv 3x3, 256, pad 1  ReLU
    conv5  conv 3x3, 256, pad 1  ReLU  max pool 3/2     7 -> 3
    fc1    flatten  dropout  Linear 2304 -> 4096  ReLU
    fc2    dropout  Linear 4096 -> 4096  ReLU
    head   Linear 4096 -> classes

Each conv layer (with its pool) and each Linear is one block, i.e. one feedback point of the
direct rules and the unit of placement: exactly 8 pipeline ranks. Dropout sits at the input of
the two hidden Linear layers as in torchvision, inside their blocks, and is `KeyedDropout` (its
masks follow the trajectory on any layout); `dropout=0` leaves it out. `width` multiplies every
channel count and hidden width (0.25: a CPU-sized model).
"""

from __future__ import annotations

from functools import partial

from torch import nn

from .blocks import Block, BlockFactory, BlockModel
from .dropout import KeyedDropout

CHANNELS = (64, 192, 384, 256, 256)
HIDDEN = (4096, 4096)


def scaled(widths: tuple[int, ...], width: float) -> list[int]:
    """`widths` times the multiplier `width`, at least 1 each."""
    return [max(1, round(w * width)) for w in widths]


def _conv(name: str, c_in: int, c_out: int, kernel: int, pool: bool) -> Block:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2), nn.ReLU()]
    if pool:
        layers.append(nn.MaxPool2d(3, stride=2))
    return Block(name, *layers)


def _dense(name: str, d_in: int, d_out: int, dropout: float, flatten: bool) -> Block:
    """[Flatten] [dropout] Linear ReLU: dropout on the layer's input, as torchvision's."""
    layers: list[nn.Module] = [nn.Flatten()] if flatten else []
    if dropout > 0:
        layers.append(KeyedDropout(dropout))
    return Block(name, *layers, nn.Linear(d_in, d_out), nn.ReLU())


def _head(d_in: int, num_classes: int, flatten: bool) -> Block:
    return Block("head", *([nn.Flatten()] if flatten else []), nn.Linear(d_in, num_classes))


def classifier_factories(d_in: int, hidden: list[int], num_classes: int,
                         dropout: float) -> list[BlockFactory]:
    """Flatten, then one block per hidden Linear (dropout, Linear, ReLU), then the head."""
    out: list[BlockFactory] = []
    for j, w in enumerate(hidden):
        out.append(partial(_dense, f"fc{j + 1}", d_in, w, dropout, j == 0))
        d_in = w
    out.append(partial(_head, d_in, num_classes, not hidden))
    return out


def build_alexnet(input_shape: tuple[int, ...], num_classes: int, width: float = 1.0,
                  dropout: float = 0.5) -> BlockModel:
    """On the meta device: 5 conv blocks, 2 hidden Linear blocks, the head (8 blocks)."""
    c_in, h, w = input_shape
    c = scaled(CHANNELS, width)
    blocks: list[BlockFactory] = []
    for j, (c_out, kernel, pool) in enumerate(zip(c, (5, 5, 3, 3, 3),
                                                  (True, True, False, False, True))):
        blocks.append(partial(_conv, f"conv{j + 1}", c_in, c_out, kernel, pool))
        c_in = c_out
    for _ in range(3):  # three max pools 3/2 (the convolutions keep the size)
        h, w = (h - 3) // 2 + 1, (w - 3) // 2 + 1
    if h < 1 or w < 1:
        raise ValueError(f"AlexNet needs inputs of at least 15x15, got {input_shape[1:]}")
    blocks += classifier_factories(c_in * h * w, scaled(HIDDEN, width), num_classes, dropout)
    return BlockModel(blocks, input_shape, num_classes)
