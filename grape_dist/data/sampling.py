"""Deterministic index streams for batching.

Every random draw here is seeded from its arguments alone (never from the rank or from global
RNG state), so all processes of a distributed run compute the same order without talking.
"""

from __future__ import annotations

import torch

from ..rng import keyed_generator


def _generator(*keys: int | str) -> torch.Generator:
    return keyed_generator("data", *keys)


def _check_count(name: str, value: int, minimum: int) -> None:
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def epoch_batches(
    num_samples: int,
    batch_size: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    drop_last: bool = False,
) -> list[torch.Tensor]:
    """Split one epoch over ``range(num_samples)`` into int64 index batches.

    The permutation depends on (seed, epoch) only. The last batch may be short unless
    ``drop_last``.
    """
    _check_count("num_samples", num_samples, 0)
    _check_count("batch_size", batch_size, 1)
    if shuffle:
        order = torch.randperm(num_samples, generator=_generator("epoch", seed, epoch))
    else:
        order = torch.arange(num_samples)
    # torch.split turns an empty tensor into one empty batch; an empty epoch has no batches.
    batches = list(torch.split(order, batch_size)) if num_samples else []
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def subset_indices(num_samples: int, n: int, seed: int) -> torch.Tensor:
    """A fixed random subset of ``n`` distinct indices in ``range(num_samples)``, sorted.

    ``n >= num_samples`` gives every index, so a subset size larger than the split is harmless.
    """
    _check_count("num_samples", num_samples, 0)
    _check_count("n", n, 0)
    if n >= num_samples:
        return torch.arange(num_samples)
    chosen = torch.randperm(num_samples, generator=_generator("subset", seed))[:n]
    return torch.sort(chosen).values


def random_batch_indices(num_samples: int, batch_size: int, seed: int, key: int,
                         stream: str = "batch") -> torch.Tensor:
    """A random batch of ``batch_size`` distinct indices, fixed by (seed, key), e.g. key=step;
    another `stream` draws independently of the default one."""
    _check_count("num_samples", num_samples, 1)
    _check_count("batch_size", batch_size, 1)
    if batch_size > num_samples:
        raise ValueError(f"batch_size {batch_size} > num_samples {num_samples}")
    return torch.randperm(num_samples, generator=_generator(stream, seed, key))[:batch_size]
