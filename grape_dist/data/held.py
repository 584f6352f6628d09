"""What one rank holds of a dataset, and how its rows become a model's input on the device.

Splits are held compactly: images as uint8 (a quarter of float32), token windows and their
targets as int32; a mini-batch is normalised (images) or widened to int64 (tokens) on the
device, when it is used. A pipeline rank holds only what its stages read: the inputs where
stage 0 lives, the labels where the last stage lives (and on every rank for DRTP, whose
feedback projects the targets). What a rank does not need is a *placeholder*: a tensor with
the split's rows and no columns, which indexes like the real split and holds no bytes, so the
batching code is the same on every rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .images import normalize


@dataclass
class Tensors:
    x: torch.Tensor  # uint8 images, or int32 token windows (a placeholder where not needed)
    y: torch.Tensor  # labels; or the windows' next tokens (int32)

    @property
    def nbytes(self) -> int:
        """The bytes held: each storage once (a language model's inputs and targets are two
        views of one token sequence)."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                    for t in (self.x, self.y)}
        return sum(storages.values())


def compact(split: Tensors) -> Tensors:
    """Token windows and their targets as int32 (vocabularies are far below 2^31), still
    sharing one sequence when they did (targets = inputs shifted by one token, data/text.py);
    images stay uint8, labels as they are."""
    x, y = split.x, split.y
    if x.dtype != torch.int64:
        return split
    shifted = (x.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()
               and x.is_contiguous() and y.is_contiguous()
               and y.storage_offset() == x.storage_offset() + 1 and x.shape == y.shape)
    if not shifted:
        return Tensors(x.to(torch.int32), y.to(torch.int32))
    ids = torch.empty(x.numel() + 1, dtype=torch.int32)  # converted in place: no int64 copy
    ids[:-1] = x.reshape(-1)
    ids[-1] = y.reshape(-1)[-1]
    return Tensors(ids[:-1].view(x.shape), ids[1:].view(y.shape))


def placeholder(t: torch.Tensor) -> torch.Tensor:
    """A tensor with `t`'s rows and no columns: `p[rows]` has as many rows as `t[rows]`."""
    return t.new_empty((len(t), 0))


def is_placeholder(t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.shape[1] == 0


def held_by_rank(split: Tensors, inputs: bool, labels: bool) -> Tensors:
    """`split` as a rank holds it: inputs only with `inputs`, labels only with `labels`."""
    return Tensors(split.x if inputs else placeholder(split.x),
                   split.y if labels else placeholder(split.y))


class InputPreparer:
    """Rows of a held split -> the model's input on `device`: images normalised per channel
    with the dataset's mean and std, tokens as int64. Placeholders pass through."""

    def __init__(self, device: torch.device, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None) -> None:
        self.device = device
        self.mean, self.std = mean, std

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if is_placeholder(x):
            return x
        if x.dtype == torch.uint8:
            if self.mean is None or self.std is None:
                raise ValueError("uint8 images need the dataset's mean and std")
            return normalize(x, self.mean, self.std)
        return x.long()


def labels_on(y: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Labels or target tokens on `device` as int64, what the loss and one-hot take."""
    return y.to(device, non_blocking=True).long()
