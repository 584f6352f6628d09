"""Models as sequences of blocks (feedback points), built from the config on the meta device."""

from __future__ import annotations

from ..config import ModelConfig
from .alexnet import build_alexnet
from .blocks import Block, BlockModel, FeedbackPoint, SignalSpec, block_taps
from .dropout import KeyedDropout, dropout_rows
from .lenet import build_lenet
from .mlp import build_mlp
from .resnet import build_resnet
from .transformer import build_transformer
from .vgg import build_vgg16

__all__ = ["Block", "BlockModel", "FeedbackPoint", "KeyedDropout", "SignalSpec", "block_taps",
           "build_alexnet", "build_lenet", "build_mlp", "build_model", "build_resnet",
           "build_transformer", "build_vgg16", "dropout_rows"]


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> BlockModel:
    """A model on the meta device: its structure (block count, output shapes) is known
    everywhere; `BlockModel.materialize` builds the blocks a rank holds. For the transformer,
    `input_shape` is (context,) and `num_classes` the vocabulary."""
    if cfg.name == "mlp":
        return build_mlp(input_shape, num_classes, cfg.hidden, cfg.activation)
    if cfg.name == "lenet":
        return build_lenet(input_shape, num_classes, cfg.channels, cfg.hidden,  # type: ignore[arg-type]
                           cfg.activation)
    if cfg.name == "resnet":
        return build_resnet(input_shape, num_classes, cfg.depth)
    if cfg.name == "transformer":
        return build_transformer(num_classes, input_shape[0], cfg.d_model, cfg.layers, cfg.heads,
                                 cfg.feedback)
    if cfg.name == "alexnet":
        return build_alexnet(input_shape, num_classes, cfg.width, cfg.dropout)
    if cfg.name == "vgg16":
        return build_vgg16(input_shape, num_classes, cfg.width, cfg.dropout)
    raise ValueError(f"unknown model {cfg.name!r}; allowed: mlp, lenet, resnet, transformer, "
                     "alexnet, vgg16")
