"""Process-group set-up and tear-down shared by every launcher."""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist


def default_backend() -> str:
    """nccl when this process has a GPU, gloo otherwise."""
    return "nccl" if torch.cuda.is_available() else "gloo"


@contextlib.contextmanager
def process_group(timeout_s: float = 300.0) -> Iterator[bool]:
    """Join the torchrun process group when launched by torchrun; yields whether one exists.

    Ends with a barrier before `destroy_process_group`: without it gloo ranks sometimes abort at
    exit ("terminate called without an active exception", DESIGN section 4).
    """
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if not launched or dist.is_initialized():
        yield dist.is_initialized()
        return
    dist.init_process_group(default_backend(), timeout=datetime.timedelta(seconds=timeout_s))
    try:
        yield True
        dist.barrier()
    finally:
        dist.destroy_process_group()
