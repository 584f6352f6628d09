"""Training-time image augmentation: random crop with zero padding and horizontal flip (the
CIFAR protocol of the ResNet papers, which the GrAPE paper's image tables follow).

Every sample's crop offset and flip are drawn per epoch from a stream keyed by (seed, epoch)
and indexed by the sample's row in the training split, so a sample looks the same in an epoch
whichever mini-batch, micro-batch, replica or rank carries it: one process and any pp x dp
mesh train on the same images.
"""

from __future__ import annotations

import torch

from ..rng import keyed_generator

# Zero padding on each side before the crop, by image side: 4 for CIFAR's 32 px, and 4 (the
# same absolute shift, as the 64 px Tiny ImageNet recipes of the paper's baselines use) at 64.
PAD = 4


class EpochAugmentation:
    """The draws of one epoch for a training split of `num_samples` rows: a crop offset
    (dy, dx) in [0, 2 * pad] and a flip bit per row."""

    def __init__(self, num_samples: int, seed: int, epoch: int, pad: int = PAD) -> None:
        self.pad = pad
        span = 2 * pad + 1
        gen = keyed_generator(seed, "augment", epoch)
        draws = torch.randint(0, span * span * 2, (num_samples,), generator=gen)
        self.dy = draws % span
        self.dx = draws // span % span
        self.flip = draws // (span * span) == 1

    def apply(self, images: torch.Tensor, rows: torch.Tensor,
              fill: torch.Tensor | None = None) -> torch.Tensor:
        """`images` (N, C, H, W) are the split's rows `rows` (N,): each cropped at its offset
        from the image padded by `pad` with `fill` (per channel, default 0) and flipped if its
        bit is set. The result is a new tensor; `images` is not changed."""
        if images.dim() != 4:
            raise ValueError(f"augmentation takes (N, C, H, W) images, got {tuple(images.shape)}")
        n, c, h, w = images.shape
        p = self.pad
        padded = images.new_empty(n, c, h + 2 * p, w + 2 * p)
        padded[:] = 0 if fill is None else fill.to(images).view(1, c, 1, 1)
        padded[:, :, p:p + h, p:p + w] = images
        rows = rows.to(torch.long).cpu()
        dy, dx, flip = self.dy[rows], self.dx[rows], self.flip[rows]
        ys = (dy[:, None] + torch.arange(h))[:, :, None]  # (N, H, 1)
        cols = torch.arange(w).expand(n, w)
        cols = torch.where(flip[:, None], w - 1 - cols, cols)  # a flip reads columns backwards
        xs = (dx[:, None] + cols)[:, None, :]  # (N, 1, W)
        device = images.device
        out = padded[torch.arange(n, device=device)[:, None, None], :, ys.to(device),
                     xs.to(device)]  # (N, H, W, C)
        return out.permute(0, 3, 1, 2).contiguous()
