"""Process-group set-up and tear-down shared by every launcher."""

from __future__ import annotations

import contextlib
import datetime
import os
import re
from collections.abc import Iterator

import torch
import torch.distributed as dist

from ..config import ConfigError


def resolve_device(choice: str = "auto") -> torch.device:
    """`auto`: this rank's GPU (cuda:LOCAL_RANK) when one exists, else the CPU."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but torch sees no GPU; use train.device=cpu or auto")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


# How gloo and nccl word a peer that died (connection reset/closed) or stopped answering (a
# timeout): they raise RuntimeErrors (DistBackendError at best), so the message is what there
# is to go by. Anything else, DistBackendErrors included, stays an ordinary error (traceback).
_PEER_FAILURE_MARKS = ("Connection reset", "Connection closed", "Connection refused",
                       "Broken pipe", "Timed out waiting", "timed out connecting",
                       "collective operation timeout", "NCCL communicator was aborted",
                       "ncclRemoteError", "Socket Timeout")


def peer_failure(exc: BaseException) -> str | None:
    """A one-line reason if `exc` is how the backend reports a lost or hung peer, else None."""
    if isinstance(exc, (dist.DistNetworkError, dist.DistStoreError)):
        return f"{type(exc).__name__}: {_first_line(exc)}"
    if not isinstance(exc, RuntimeError):
        return None
    text = _first_line(exc)
    if not any(m in text for m in _PEER_FAILURE_MARKS):
        return None
    # gloo prefixes the C++ source location: "[/__w/.../pair.cc:537] Read error ..."
    return re.sub(r"^\[[^\]]*\]\s*", "", text).split(" This is typically")[0]


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def backend_for(device: torch.device) -> str:
    """nccl for GPU tensors, gloo for CPU tensors."""
    return "nccl" if device.type == "cuda" else "gloo"


def _restart_store(timeout: datetime.timedelta) -> dict:
    """Under torchrun, the store keys of each restart attempt in their own namespace.

    torchrun (--max-restarts) keeps its store across restarts, and gloo's rendezvous keys from
    the failed attempt survive there: a restarted rank reads its peer's dead address and fails
    in connectFullMesh. Measured with torch 2.13, see docs/faults.md."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return {}
    from torch.distributed.rendezvous import rendezvous

    store, rank, world_size = next(rendezvous("env://", timeout=timeout))
    return {"store": dist.PrefixStore(f"grape_dist/attempt_{attempt}", store), "rank": rank,
            "world_size": world_size}


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
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group(backend, timeout=timeout, **_restart_store(timeout),
                            device_id=device if backend == "nccl" else None)
    try:
        yield True
        dist.barrier()
    finally:
        dist.destroy_process_group()
