"""Point-to-point transfer of a stage's outputs (activation and tangent bundle).

A transfer is a fixed-size int64 header (how many tensors, and for each its dtype and shape)
followed by the tensors, so the receiver needs no shapes in advance (nanotron's pattern). Sends
are batched `isend`s that the caller waits on later, so communication overlaps the next
micro-batch's compute.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_HEADER = 32  # int64 slots: [n, (dtype, ndim, dims...)*]
_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.bool]


def _header(tensors: list[torch.Tensor | None], device: torch.device) -> torch.Tensor:
    h = [len(tensors)]
    for t in tensors:
        if t is None:
            h += [-1, 0]
        else:
            h += [_DTYPES.index(t.dtype), t.dim(), *t.shape]
    if len(h) > _HEADER:
        raise ValueError(f"too many dims to describe in a {_HEADER}-slot header")
    return torch.tensor(h + [0] * (_HEADER - len(h)), dtype=torch.int64, device=device)


def _parse(header: torch.Tensor) -> list[tuple[torch.dtype, tuple[int, ...]] | None]:
    h = header.tolist()
    out, i = [], 1
    for _ in range(h[0]):
        code, ndim = h[i], h[i + 1]
        if code < 0:
            out.append(None)
        else:
            out.append((_DTYPES[code], tuple(h[i + 2:i + 2 + ndim])))
        i += 2 + ndim
    return out


def isend(tensors: list[torch.Tensor | None], dst: int,
          device: torch.device | str = "cpu") -> list:
    """Start sending `tensors` (on `device`: CUDA for nccl) to rank `dst`; returns the works
    to wait on."""
    ops = [dist.P2POp(dist.isend, _header(tensors, torch.device(device)), dst)]
    ops += [dist.P2POp(dist.isend, t.contiguous(), dst) for t in tensors if t is not None]
    return dist.batch_isend_irecv(ops)


def recv(src: int, device: torch.device | str = "cpu") -> list[torch.Tensor | None]:
    """Receive what `isend` sent from rank `src`, into tensors on `device`."""
    header = torch.empty(_HEADER, dtype=torch.int64, device=device)
    dist.recv(header, src)
    specs = _parse(header)
    out = [None if s is None else torch.empty(s[1], dtype=s[0], device=device) for s in specs]
    ops = [dist.P2POp(dist.irecv, t, src) for t in out if t is not None]
    if ops:
        for w in dist.batch_isend_irecv(ops):
            w.wait()
    return out


def wait_all(works: list) -> None:
    for w in works:
        w.wait()
