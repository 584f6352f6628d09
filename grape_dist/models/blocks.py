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

import torch
from torch import nn

from ..rng import key_seed


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


def _is_meta(block: nn.Module) -> bool:
    return any(t.is_meta for t in (*block.parameters(), *block.buffers()))


class BlockModel(nn.Module):
    """A plain sequence of blocks; parallelism and learning rules are applied from outside.

    `blocks` are either built blocks (used as they are) or zero-argument factories. Factory
    blocks start on the meta device and take no memory until `materialize` builds them.
    """

    def __init__(self, blocks: list[Block | BlockFactory], input_shape: tuple[int, ...],
                 num_classes: int) -> None:
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
        self.num_classes = num_classes
        # Record each block's output shape once (on the meta device: no compute, no memory), so
        # that feedback matrices and pipeline buffers are sized without running data.
        shape = tuple(input_shape)
        with torch.no_grad():
            for block in self.blocks:
                device = "meta" if _is_meta(block) else next(
                    (t.device for t in (*block.parameters(), *block.buffers())), "cpu")
                block.out_shape = tuple(block(torch.zeros(1, *shape, device=device)).shape[1:])
                shape = block.out_shape
        if self.blocks[-1].out_shape != (num_classes,):
            raise ValueError(
                f"last block must output {num_classes} logits, got {self.blocks[-1].out_shape}")

    def materialize(self, indices: Iterable[int] | None = None, seed: int = 0,
                    device: torch.device | str = "cpu") -> BlockModel:
        """Build blocks `indices` (default: all) for real, on `device`; returns self.

        A factory block is built on the CPU under the random stream keyed by (seed, "init",
        index) and then moved, so its initial weights depend on neither the device nor the
        partition. A block given already built is only moved.
        """
        for i in (range(len(self.blocks)) if indices is None else indices):
            if self._factories[i] is not None and _is_meta(self.blocks[i]):
                self.blocks[i] = self.build_block(i, seed)
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
        return block

    def is_materialized(self, index: int) -> bool:
        return not _is_meta(self.blocks[index])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def __len__(self) -> int:
        return len(self.blocks)
