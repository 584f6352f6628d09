"""Models as sequences of blocks (feedback points), built from the config."""

from __future__ import annotations

from .blocks import Block, BlockModel
from .lenet import build_lenet
from .mlp import build_mlp

__all__ = ["Block", "BlockModel", "build_model", "build_lenet", "build_mlp"]


def build_model(
    name: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    hidden: list[int],
    channels: list[int] | None = None,
    act: str = "relu",
) -> BlockModel:
    """Build a Table 1 model by name (`mlp` or `lenet`)."""
    if name == "mlp":
        return build_mlp(input_shape, num_classes, hidden, act)
    if name == "lenet":
        return build_lenet(input_shape, num_classes, channels or [6, 16], hidden, act)  # type: ignore[arg-type]
    raise ValueError(f"unknown model {name!r}; allowed: mlp, lenet")
