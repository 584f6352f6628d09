"""Launch `python -m grape_dist.train` ranks for the multi-rank tests, without paying for
torch's import in every rank.

A rank launched by torchrun is a fresh interpreter: importing torch, and TorchDynamo (which
every `torch.optim` optimiser imports on construction), costs about 3 s of CPU before the
first step, while a test's tiny run trains in under a second. On the 2 CI cores a 4-rank run
took 19 s under torchrun and 2.3 s here.

Here the ranks are forked from a multiprocessing *forkserver* that imported torch and
grape_dist once, when the first test asked for it. Each rank is still its own OS process with
its own address space, joined by a real torch.distributed process group (gloo, or nccl on
GPUs) through the environment (`RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`), the way
Slurm and the DeepSpeed launcher start ranks; it runs the same `grape_dist.train.main` that
`python -m grape_dist.train` runs. The forkserver itself never runs a step, so no thread pool
or process group is inherited. torchrun itself stays covered by the tests that are about the
launcher (layout errors here, tests/test_launchers.py, tests/test_checkpoint.py).
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# What a rank imports before its first step; the forkserver imports it once.
PRELOAD = ["torch", "torch._dynamo", "torch.distributed", "grape_dist.train",
           "grape_dist.trainer", "grape_dist.runtime", "rank_launcher"]
# After the first rank fails, the others get this long to stop by themselves (a collective
# that lost its peer raises) before they are terminated, as torchrun's agent does.
GRACE_S = 10.0

_context: multiprocessing.context.ForkServerContext | None = None


def _forkserver() -> multiprocessing.context.ForkServerContext:
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(argv: list[str], env: dict[str, str], cwd: str, out: str, err: str) -> None:
    """In the forked rank: its environment, working folder and output files, then the CLI."""
    os.environ.update(env)
    os.chdir(cwd)
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    from grape_dist.train import main

    sys.exit(main(argv))


def run_ranks(nproc: int, argv: list[str], cwd: Path, env: dict[str, str] | None = None,
              timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m grape_dist.train ARGV` as `nproc` ranks on this machine and wait.

    Returns like `subprocess.run(capture_output=True, text=True)`: the ranks' stdout and
    stderr concatenated in rank order, and the first non-zero exit code (0 when every rank
    succeeded). A failed rank's peers are terminated after `GRACE_S`; all are killed at
    `timeout`, which raises `subprocess.TimeoutExpired`."""
    ctx = _forkserver()
    port = str(_free_port())
    with tempfile.TemporaryDirectory(prefix="ranks_") as logs:
        procs, files = [], []
        for rank in range(nproc):
            rank_env = {**(env or {}), "RANK": str(rank), "WORLD_SIZE": str(nproc),
                        "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(nproc),
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}
            out, err = (os.path.join(logs, f"{kind}{rank}") for kind in ("out", "err"))
            p = ctx.Process(target=_rank_main, args=(argv, rank_env, str(cwd), out, err),
                            name=f"rank{rank}")
            p.start()
            procs.append(p)
            files.append((out, err))
        code = _wait(procs, timeout, argv)
        texts = [[Path(f).read_text() if os.path.exists(f) else "" for f in pair]
                 for pair in files]
    return subprocess.CompletedProcess(["ranks", str(nproc), *argv], code,
                                       "".join(t[0] for t in texts), "".join(t[1] for t in texts))


def _wait(procs: list, timeout: float, argv: list[str]) -> int:
    deadline = time.monotonic() + timeout
    failed_at = None
    while any(p.exitcode is None for p in procs):
        now = time.monotonic()
        if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
            failed_at = now
        if now > deadline or (failed_at is not None and now > failed_at + GRACE_S):
            for p in procs:
                if p.exitcode is None:
                    p.terminate()
            for p in procs:
                p.join(5)
                if p.exitcode is None:
                    p.kill()
                    p.join()
            if now > deadline:
                raise subprocess.TimeoutExpired(["ranks", *argv], timeout)
            break
        time.sleep(0.05)
    codes = [p.exitcode for p in procs]
    # A rank's own failure (a positive code) before the signals that stopped its peers.
    return next((c for c in codes if c > 0), next((c for c in codes if c), 0))
