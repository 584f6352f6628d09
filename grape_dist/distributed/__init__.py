"""Process-group set-up and tear-down shared by every launcher."""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist


def resolve_device(choice: str = "auto") -> torch.device:
    """`auto`: this rank's GPU (cuda:LOCAL_RANK) when one exists, else the CPU."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device=cuda but torch sees no GPU; use train.device=cpu")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


def backend_for(device: torch.device) -> str:
    """nccl for GPU tensors, gloo for CPU tensors."""
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def process_group(timeout_s: float = 300.0, device: torch.device | None = None) -> Iterator[bool]:
    """Join the torchrun process group when launched by torchrun; yields whether one exists.

    Ends with a barrier before `destroy_process_group`: without it gloo ranks sometimes abort at
    exit ("terminate called without an active exception", DESIGN section 4).
    """
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if not launched or dist.is_initialized():
        yield dist.is_initialized()
        return
    backend = backend_for(device or torch.device("cpu"))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                            device_id=device if backend == "nccl" else None)
    try:
        yield True
        dist.barrier()
    finally:
        dist.destroy_process_group()
