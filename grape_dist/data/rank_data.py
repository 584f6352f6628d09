"""A rank's dataset, from the config to mini-batches on the device: which splits and subsets
are loaded, what this rank keeps of them (data/held.py), the alignment probe's rows, and the rows
of a training step as the epoch shows them (augmented), of a calibration check, of evaluation.
The trainer asks it for rows; it never asks the trainer for anything."""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist

from ..config import TEXT_DATASETS, Config
from .augment import EpochAugmentation
from .held import InputPreparer, Tensors, compact, held_by_rank, is_placeholder, labels_on
from .images import load_image_dataset
from .sampling import random_batch_indices, subset_indices
from .sources import get_source
from .text import load_text_dataset

log = logging.getLogger("grape_dist")


def load_tensors(cfg: Config) -> tuple[Tensors, Tensors, str]:
    """The configured training and test splits (their subsets), compact, and where they came
    from: uint8 images (normalised per mini-batch on the device), int32 token windows."""
    d = cfg.data
    if d.name in TEXT_DATASETS:
        text = load_text_dataset(d.name, d.root, d.seq_len, d.tokenizer, d.vocab_size)
        return (compact(_subset(text.train_x, text.train_y, d.train_subset, cfg.seed,
                                "data.train_subset", d.name)),
                compact(_subset(text.test_x, text.test_y, d.test_subset, cfg.seed,
                                "data.test_subset", d.name)), text.source)
    ds = load_image_dataset(d.name, d.root)
    return (_subset(ds.train.images, ds.train.labels, d.train_subset, cfg.seed,
                    "data.train_subset", d.name),
            _subset(ds.test.images, ds.test.labels, d.test_subset, cfg.seed,
                    "data.test_subset", d.name), ds.source)


def _subset(x: torch.Tensor, y: torch.Tensor, n: int, seed: int, key: str = "",
            dataset: str = "") -> Tensors:
    """A fixed random subset of n samples (0 = all). More than the split holds takes all of
    it, and rank 0 says so in one line (naming `key`) instead of clamping silently."""
    if not n:
        return Tensors(x, y)
    if n > len(y) and (not dist.is_initialized() or dist.get_rank() == 0):
        log.warning("%s=%d is larger than the %d samples of %s's split: using all %d",
                    key, n, len(y), dataset, len(y))
    idx = subset_indices(len(y), n, seed)
    return Tensors(x[idx], y[idx])


class RankData:
    """The splits as this rank holds them (`inputs` where stage 0 lives, `labels` where the last
    stage does) and their rows on `device`."""

    def __init__(self, cfg: Config, train: Tensors, test: Tensors, inputs: bool, labels: bool,
                 device: torch.device) -> None:
        self.cfg = cfg
        self.device = device
        self.train = held_by_rank(train, inputs, labels)
        self.test = held_by_rank(test, inputs, labels)
        src = None if cfg.data.name in TEXT_DATASETS else get_source(cfg.data.name)
        self.inputs = InputPreparer(device, *((src.mean, src.std) if src else ()))
        n = len(self.train.y)
        probe = subset_indices(n, min(cfg.train.probe_batch_size, n), cfg.seed + 1)
        # The alignment probe's rows, on the device once.
        self.probe = Tensors(self.inputs(self.train.x[probe]),
                             labels_on(self.train.y[probe], device))
        self._augment: tuple[int, EpochAugmentation] | None = None  # this epoch's draws

    @property
    def nbytes(self) -> int:
        """The bytes this rank holds of the dataset (summary.json's dataset_bytes_per_rank)."""
        return self.train.nbytes + self.test.nbytes

    def training_rows(self, rows: torch.Tensor, epoch: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
        """The training split's rows `rows` on the device, as this epoch shows them: cropped
        and flipped with `data.augment` (keyed by seed, epoch and row: data/augment.py; the
        padding is black, uint8 zeros)."""
        x = self.train.x[rows]
        if self.cfg.data.augment and not is_placeholder(x):
            if self._augment is None or self._augment[0] != epoch:
                self._augment = (epoch, EpochAugmentation(len(self.train.y), self.cfg.seed,
                                                          epoch))
            x = self._augment[1].apply(x, rows)
        return self.inputs(x), labels_on(self.train.y[rows], self.device)

    def plain_rows(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Training rows on the device as the test set is seen (no augmentation)."""
        return self.inputs(self.train.x[rows]), labels_on(self.train.y[rows], self.device)

    def check_indices(self, batch: torch.Tensor, epoch: int, count: int) -> torch.Tensor:
        """The `count` training rows (calibration.check_rows) a calibration is judged on: drawn
        by (seed, epoch) apart from the calibration batch `batch` (the batch itself when it is
        the whole split)."""
        n = len(self.train.y)
        order = random_batch_indices(n, n, self.cfg.seed, epoch, stream="calibration check")
        taken = torch.zeros(n, dtype=torch.bool)
        taken[batch] = True
        idx = order[~taken[order]][:count]
        return idx if len(idx) else batch
