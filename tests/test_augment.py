"""Crop-and-flip augmentation (data/augment.py) against a per-image reference, and keyed so
that any split of the rows sees the same images."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from grape_dist.config import ConfigError, load_config
from grape_dist.data.augment import EpochAugmentation


def _reference(img: torch.Tensor, dy: int, dx: int, flip: bool, fill: torch.Tensor,
               pad: int = 4) -> torch.Tensor:
    """One image: pad each channel with its fill value, cut the window at (dy, dx), mirror."""
    c, h, w = img.shape
    padded = torch.stack([F.pad(img[k], (pad, pad, pad, pad), value=float(fill[k]))
                          for k in range(c)])
    out = padded[:, dy:dy + h, dx:dx + w]
    return out.flip(-1) if flip else out


@pytest.mark.parametrize("side", [32, 64])
def test_crop_and_flip_match_a_per_image_reference(side):
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(40, 3, side, side, generator=gen)
    rows = torch.randperm(1000, generator=gen)[:40]
    fill = torch.tensor([-1.9, -2.0, -1.7])
    aug = EpochAugmentation(1000, seed=3, epoch=2)
    out = aug.apply(images, rows, fill)
    assert out.shape == images.shape
    for i, r in enumerate(rows.tolist()):
        ref = _reference(images[i], int(aug.dy[r]), int(aug.dx[r]), bool(aug.flip[r]), fill)
        torch.testing.assert_close(out[i], ref, rtol=0, atol=0)
    # The rows carried crops other than the identity and both flips: the check saw them.
    assert {bool(aug.flip[r]) for r in rows.tolist()} == {False, True}
    assert len({(int(aug.dy[r]), int(aug.dx[r])) for r in rows.tolist()}) > 10


def test_a_rows_image_does_not_depend_on_the_batch_that_carries_it():
    """Keyed by (seed, epoch, row): the same rows split into other batches, in another order,
    give the same images; another epoch or seed gives other draws."""
    images = torch.randn(12, 3, 32, 32)
    rows = torch.arange(100, 112)
    whole = EpochAugmentation(500, seed=0, epoch=1).apply(images, rows)
    order = torch.tensor([5, 11, 0, 3, 8, 1, 10, 2, 9, 4, 7, 6])
    parts = [EpochAugmentation(500, seed=0, epoch=1).apply(images[order[a:b]], rows[order[a:b]])
             for a, b in ((0, 5), (5, 12))]
    torch.testing.assert_close(torch.cat(parts), whole[order], rtol=0, atol=0)
    a, b, c = (EpochAugmentation(500, seed=s, epoch=e) for s, e in ((0, 1), (0, 2), (1, 1)))
    assert not torch.equal(a.dy, b.dy) and not torch.equal(a.dy, c.dy)


def test_draws_cover_every_offset_and_both_flips_uniformly():
    aug = EpochAugmentation(81_000, seed=0, epoch=1)
    counts = torch.bincount(aug.dy * 9 + aug.dx, minlength=81).float()
    assert counts.min() > 0.8 * 1000 and counts.max() < 1.2 * 1000
    assert abs(aug.flip.float().mean().item() - 0.5) < 0.01


def test_augment_is_refused_where_crop_and_flip_change_the_label():
    with pytest.raises(ConfigError, match="data.augment.*cifar10.*mnist"):
        load_config(None, ["data.name=mnist", "data.augment=true"])
    with pytest.raises(ConfigError, match="data.augment"):
        load_config(None, ["data.name=shakespeare", "model.name=transformer",
                           "data.augment=true"])
    assert load_config(None, ["data.name=cifar10", "model.name=resnet",
                              "data.augment=true"]).data.augment


def test_trainer_trains_on_augmented_images_padded_with_black(tmp_path):
    """data.augment: the trainer's training rows are the raw rows cropped and flipped with the
    epoch's draws, padded with black (0 before normalisation: -mean/std per channel); the
    calibration batch too; evaluation data is left as it is."""
    from helpers import write_cifar100

    from grape_dist.data.images import normalize
    from grape_dist.data.sources import get_source
    from grape_dist.trainer import Trainer

    write_cifar100(tmp_path, n_train=48, n_test=16)
    cfg = load_config(None, ["model.name=resnet", "model.depth=8", "data.name=cifar100",
                             f"data.root={tmp_path}", "data.batch_size=16",
                             "data.augment=true", "train.progress=false"])
    trainer = Trainer(cfg, None)
    rows = torch.tensor([3, 40, 7, 19])
    x, y = trainer.data.training_rows(rows, epoch=2)
    src = get_source("cifar100")
    black = -torch.tensor(src.mean) / torch.tensor(src.std)
    aug = EpochAugmentation(48, cfg.seed, 2)
    # The split is held as uint8 (data/held.py) and the crop made before normalising; the
    # reference normalises first and pads with normalised black.
    assert trainer.train.x.dtype == torch.uint8
    plain = normalize(trainer.train.x[rows], src.mean, src.std)
    for i, r in enumerate(rows.tolist()):
        ref = _reference(plain[i], int(aug.dy[r]), int(aug.dx[r]), bool(aug.flip[r]), black)
        torch.testing.assert_close(x[i], ref)
    assert torch.equal(y, trainer.train.y[rows])
    assert not torch.equal(x, plain)
