"""A model is a sequence of blocks; a block is one feedback point of the learning rules.

`h_0 = x`, `h_l = f_l(h_{l-1})`, logits `= h_L`. The direct rules project the output error onto
each block's output `h_l`; inside a block, local backprop is allowed (as in Launay et al. 2020's
macro/micro DFA). The pipeline runtime partitions a model by whole blocks, so a block is also
the unit of placement.

Models are built on the meta device from block factories: every rank knows the whole model's
structure (block count, output shapes) without holding any of its weights, then materialises
only the blocks of its own stages. Each block is initialised from a random stream keyed by
(seed, block index), so its weights are the same whichever rank builds it and however the model
is split.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from ..rng import key_seed
from .dropout import assign_dropout_keys


@dataclass(frozen=True)
class SignalSpec:
    """The shape of what the last stage broadcasts, per sample.

    A classifier has one output per sample and broadcasts its logits' error (`width` =
    `num_classes`). A language model has `positions` outputs per sample (tokens); following
    Launay et al. 2020 it broadcasts the error at the head's input, `width` = d_model values per
    token, and its feedback matrices are shared over positions.
    """

    num_classes: int
    positions: int = 1
    width: int = 0  # 0: num_classes (the error at the logits)

    @property
    def signal_width(self) -> int:
        return self.width or self.num_classes

    @property
    def at_head_input(self) -> bool:
        return self.width > 0

    def tangent_tail(self) -> tuple[int, ...]:
        """Per tangent row, the shape of an output tangent."""
        w = self.signal_width
        return (w,) if self.positions == 1 else (self.positions, w)


@dataclass(frozen=True)
class FeedbackPoint:
    """Where a direct rule injects a projected signal (and GrAPE draws a tangent) and which
    weights that signal trains.

    With `feedback.points: block` (the paper's form) every hidden block's output is one point
    and its whole block is trained from it by local backprop. With `layer`, a block whose
    layers expose `taps` (residual blocks, attention and MLP sub-layers) has one point per
    weight layer, and each weight layer is trained from its own point only (rules/points.py).
    """

    index: int  # global number: keys B, the point's tangent draws and its tangent stream
    block: int  # the block it sits in
    name: str
    shape: tuple[int, ...]  # per sample
    tap: int | None = None  # None: the block's output; else its number among the block's taps


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


BlockFactory = Callable[[], Block]


def block_taps(block: Block) -> list[tuple[str, tuple[int, ...]]] | None:
    """(name, per-sample shape) of the feedback points at the weight layers of `block`, when
    every layer of it exposes `taps(out_shape)`; None otherwise (one point at its output)."""
    layers = list(block)
    if not layers or not all(hasattr(layer, "taps") for layer in layers):
        return None
    return [tap for layer in layers for tap in layer.taps(block.out_shape)]


def _is_meta(block: nn.Module) -> bool:
    return any(t.is_meta for t in (*block.parameters(), *block.buffers()))


class BlockModel(nn.Module):
    """A plain sequence of blocks; parallelism and learning rules are applied from outside.

    `blocks` are either built blocks (used as they are) or zero-argument factories. Factory
    blocks start on the meta device and take no memory until `materialize` builds them.
    """

    def __init__(self, blocks: list[Block | BlockFactory], input_shape: tuple[int, ...],
                 num_classes: int, *, input_dtype: torch.dtype | None = None,
                 signal_at_head_input: bool = False) -> None:
        super().__init__()
        self._factories: list[BlockFactory | None] = []
        built = []
        for b in blocks:
            if isinstance(b, nn.Module):
                self._factories.append(None)
                built.append(b)
            else:
                self._factories.append(b)
                with torch.device("meta"):
                    built.append(b())
        self.blocks = nn.ModuleList(built)
        self.input_shape = tuple(input_shape)
        self.input_dtype = input_dtype  # None: the default float dtype; torch.long for tokens
        self.num_classes = num_classes
        # Record each block's output shape once (on the meta device: no compute, no memory), so
        # that feedback matrices and pipeline buffers are sized without running data.
        shape = tuple(input_shape)
        with torch.no_grad():
            for block in self.blocks:
                device = "meta" if _is_meta(block) else next(
                    (t.device for t in (*block.parameters(), *block.buffers())), "cpu")
                dtype = input_dtype if block is self.blocks[0] else None
                block.out_shape = tuple(
                    block(torch.zeros(1, *shape, device=device, dtype=dtype)).shape[1:])
                shape = block.out_shape
        out = self.blocks[-1].out_shape
        if not out or out[-1] != num_classes:
            raise ValueError(f"last block must output {num_classes} logits, got {out}")
        # A language model's logits are (positions, classes): its error is taken at the head's
        # input (d_model per position) and its feedback is shared over positions.
        positions = math.prod(out[:-1])
        width = 0
        if signal_at_head_input:
            head_in = self.blocks[-2].out_shape if len(self.blocks) > 1 else tuple(input_shape)
            if tuple(head_in[:-1]) != tuple(out[:-1]):
                raise ValueError(f"head input {head_in} and logits {out} differ in positions")
            width = head_in[-1]
        self.signal_spec = SignalSpec(num_classes, positions, width)

    def feedback_points(self, layer: bool = False) -> list[FeedbackPoint]:
        """The model's feedback points, in forward order: one per hidden block (its output), or
        with `layer` one per weight layer of the blocks that expose taps (`block_taps`)."""
        points: list[FeedbackPoint] = []
        for i, block in enumerate(self.blocks[:-1]):
            taps = block_taps(block) if layer else None
            if taps is None:
                points.append(FeedbackPoint(len(points), i, block.name, block.out_shape))
                continue
            for j, (name, shape) in enumerate(taps):
                points.append(FeedbackPoint(len(points), i, f"{block.name}.{name}", shape, j))
        return points

    def feedback_width(self, point: FeedbackPoint, per_channel: bool = False) -> int:
        """Columns of a point's feedback matrix: its flattened size, or its channels when the
        feedback is shared over positions (a language model's tokens, SignalSpec.positions > 1;
        or with `per_channel`, the positions of a conv point's (C, H, W) shape)."""
        shape = point.shape
        if self.signal_spec.positions == 1:
            if per_channel and len(shape) == 3:
                return shape[0]
            return math.prod(shape)
        if math.prod(shape[:-1]) != self.signal_spec.positions:
            raise ValueError(f"feedback point {point.name} has shape {shape}; feedback shared "
                             f"over {self.signal_spec.positions} positions needs "
                             "(positions, channels)")
        return shape[-1]

    def materialize(self, indices: Iterable[int] | None = None, seed: int = 0,
                    device: torch.device | str = "cpu") -> BlockModel:
        """Build blocks `indices` (default: all) for real, on `device`; returns self.

        A factory block is built on the CPU under the random stream keyed by (seed, "init",
        index) and then moved, so its initial weights depend on neither the device nor the
        partition. A block given already built is only moved. Either way its `KeyedDropout`s
        are keyed by (seed, index), so their masks do not depend on the partition either.
        """
        for i in (range(len(self.blocks)) if indices is None else indices):
            if self._factories[i] is not None and _is_meta(self.blocks[i]):
                self.blocks[i] = self.build_block(i, seed)
            assign_dropout_keys(self.blocks[i], seed, i)
            self.blocks[i].to(device)
        return self

    def build_block(self, index: int, seed: int) -> Block:
        """A freshly initialised copy of factory block `index` on the CPU (not stored)."""
        factory = self._factories[index]
        if factory is None:
            raise ValueError(f"block {index} was given built; it has no factory")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(key_seed(seed, "init", index))
            block = factory()
        block.out_shape = self.blocks[index].out_shape
        assign_dropout_keys(block, seed, index)
        return block

    def is_materialized(self, index: int) -> bool:
        return not _is_meta(self.blocks[index])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def __len__(self) -> int:
        return len(self.blocks)
