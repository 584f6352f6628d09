"""Random streams keyed by what they are for, never by rank.

A tangent drawn for (step, block) must be the same whichever rank holds the block, so that one
process and P pipeline ranks follow the same trajectory (DESIGN section 3).
"""

from __future__ import annotations

import hashlib

import torch


def key_seed(*keys: int | str) -> int:
    """A 63-bit seed that depends only on `keys` (stable across processes and Python runs)."""
    digest = hashlib.blake2b(repr(keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def keyed_generator(*keys: int | str, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator on `device` seeded by `keys`. The CPU's is the reference stream; a CUDA
    generator with the same seed gives other numbers (still the same on every rank)."""
    return torch.Generator(device=device).manual_seed(key_seed(*keys))
