"""Checks a run makes before its first step, and the threads each process may use. Every rank
runs them; `agree_to_start` makes the ranks stop together when one of them failed."""

from __future__ import annotations

import logging
import os

import torch.distributed as dist

from .config import Config
from .errors import DataError, RankFailures, StartupError

log = logging.getLogger("grape_dist")


def threads_per_process(threads: int, local_world_size: int | None = None,
                        cpus: int | None = None) -> int:
    """`train.threads` for this process: as configured, unless the processes on this node
    (LOCAL_WORLD_SIZE, set by torchrun) would then ask for more threads than the node has
    CPUs; then each gets its share, at least 1 (said once, by local rank 0). 0: torch's
    default, which torch already divides."""
    local = local_world_size or int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if not cpus:  # the CPUs this process may use (macOS has no affinity call: all of them)
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
            os.cpu_count() or 1
    if not threads or threads * local <= cpus:
        return threads
    share = max(1, cpus // local)
    if share >= threads:  # one thread each is the least there is
        return threads
    if os.environ.get("LOCAL_RANK", "0") == "0":
        log.warning("train.threads=%d x %d processes on this node would oversubscribe its %d "
                    "CPUs: %d thread(s) each", threads, local, cpus, share)
    return share


def check_fits_data(cfg: Config, train_samples: int) -> None:
    """A mini-batch the training split cannot fill is refused (DataError) before the first step
    (calibration and probe batches are capped at the split's size instead)."""
    where = (f"the {train_samples} training samples of {cfg.data.name}"
             + (f" (data.train_subset={cfg.data.train_subset})" if cfg.data.train_subset else ""))
    if cfg.data.batch_size > train_samples:
        raise DataError(f"data.batch_size={cfg.data.batch_size} is larger than {where}: lower "
                        "data.batch_size or train on more data")


def agree_to_start(failure: StartupError | None) -> None:
    """Collective (when a group exists): every rank raises RankFailures if any rank's start-up
    checks failed, so all stop before the first step and rank 0 reports for all."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        if failure is not None:
            raise failure
        return
    mine = None if failure is None else (failure.prefix, str(failure))
    found: list[tuple[str, str] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(found, mine)
    failures: dict[tuple[str, str], list[int]] = {}
    for rank, entry in enumerate(found):
        if entry is not None:
            failures.setdefault(tuple(entry), []).append(rank)
    if failures:
        raise RankFailures(failures, len(found))
