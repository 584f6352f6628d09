"""A run folder's policy: where a run may write, resuming, torchrun restarts, and the lock
that keeps two runs out of one folder.

Every check here runs before the trainer exists, so a refused run writes nothing. The entry
points (`train.py` for one process and torchrun, `ray_job.py` for Ray) call `prepare_output`
and, on the rank that writes, `RunLock.acquire`.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from .errors import UsageError
from .fileio import atomic_write_text
from .metrics.writer import held_run_files


def _check_writable(out: Path) -> None:
    """--out must be a folder this process can create or write into (checked, not tried: a
    refused run writes nothing)."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder: choose another --out")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"--out {out} cannot be created: {probe} is a file, not a folder; "
                         "choose another --out")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: {probe} is not writable by this user; choose another "
                         "--out or fix its permissions")


def restart_attempt() -> int:
    """How many times torchrun (--max-restarts) has restarted this job's workers; 0 at first."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


LAUNCH_FILE = "launch.json"  # which torchrun job started the run in a folder


def mark_launch(out: Path) -> None:
    """Record the torchrun job (TORCHELASTIC_RUN_ID) that started or continued the run in
    `out`, once its outputs exist: restarts of this job may continue it, no other job may."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    if run_id:
        atomic_write_text(out / LAUNCH_FILE, json.dumps({"torchelastic_run_id": run_id}) + "\n")


def _launched_here(out: Path) -> bool:
    try:
        saved = json.loads((out / LAUNCH_FILE).read_text())["torchelastic_run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return saved == os.environ.get("TORCHELASTIC_RUN_ID")


def resume_after_restart(args: argparse.Namespace) -> None:
    """Under `torchrun --max-restarts`, restarted workers run the original command line again.
    If this torchrun job had started the run in --out (launch.json), they continue it from its
    newest checkpoint, or start it over when the failure came before the first checkpoint.
    Otherwise (the first attempt was refused, or died before its outputs existed) the restart
    is checked like the first attempt: a run that belongs to another job is never touched."""
    if restart_attempt() == 0 or args.resume or not args.out:
        return
    from .runtime.checkpoint import latest_checkpoint

    out = Path(args.out)
    if not _launched_here(out):
        return
    if (out / "config.yaml").is_file() and latest_checkpoint(out) is not None:
        args.resume, args.out, args.config = str(out), None, None
        args.overwrite = False
    else:
        args.overwrite = True


def prepare_output(args: argparse.Namespace) -> Path | None:
    """Check --out / --resume / --overwrite before anything runs; returns the checkpoint to
    resume from (None for a fresh run). Nothing is removed here: with --overwrite the trainer
    clears the earlier run only once the new one has its data and stages."""
    from .runtime.checkpoint import latest_checkpoint

    if args.resume:
        if args.config:
            raise UsageError("--resume takes the run's own config.yaml; drop --config (give "
                             "overrides such as train.epochs=N instead)")
        if args.out and Path(args.out).resolve() != Path(args.resume).resolve():
            raise UsageError("--resume continues the run in place: drop --out or make it the "
                             "same folder")
        if args.overwrite:
            raise UsageError("--resume and --overwrite contradict each other")
        run = Path(args.resume)
        if not (run / "config.yaml").is_file():
            raise UsageError(f"--resume {run}: no config.yaml there, not a run folder")
        _check_writable(run)
        ckpt = latest_checkpoint(run)
        if ckpt is None:
            raise UsageError(f"--resume {run}: the run has no checkpoint to continue from "
                             f"({run / 'checkpoints'} is missing or empty)")
        args.out = str(run)
        return ckpt
    if not args.out:
        return None
    out = Path(args.out)
    _check_writable(out)
    held = held_run_files(out)
    if held and not args.overwrite:
        raise UsageError(f"--out {out} already holds a run ({', '.join(held)}): pass --resume "
                         f"{out} to continue it, --overwrite to replace it, or another --out")
    return None


LOCK_FILE = ".grape_dist.lock"  # held by the process writing the run in a folder


class RunLock:
    """An exclusive `flock` on `<out>/.grape_dist.lock`, held by the one process that writes
    a run's outputs (rank 0) until it exits. The kernel drops the lock when its holder dies, so
    a lock left by a crashed or killed run is stale by construction and the next run takes it;
    the file's content (pid, host, start time) only names the holder in the refusal."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / LOCK_FILE
        self._fd: int | None = None
        self._made: list[Path] = []  # what acquire created: folders, then the file
        self._previous = b""

    def acquire(self) -> None:
        """Take the lock, or refuse (UsageError) while another live process holds it."""
        missing = [p for p in (self.path.parent, *self.path.parent.parents) if not p.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._made = missing[::-1] + ([] if self.path.exists() else [self.path])
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip()
            os.close(fd)
            try:
                who = json.loads(holder)
                since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(who["started"]))
                desc = f"pid {who['pid']} on {who['host']}, since {since}"
            except (ValueError, KeyError, TypeError):
                desc = "another process"
            raise UsageError(f"--out {self.path.parent} is in use by a running run ({desc}): "
                             "wait for it to finish, stop it, or choose another --out") from None
        self._previous = os.read(fd, 4096)  # the last holder's note, put back by cleanup
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.time()}).encode())
        self._fd = fd

    def release(self, cleanup: bool = False) -> None:
        """Drop the lock (the kernel does it too when the process exits). `cleanup`: for a run
        refused before it wrote anything, also remove what `acquire` created: the lock file and
        the folders that hold nothing else."""
        if self._fd is None:
            return
        if cleanup and self.path not in self._made:
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, self._previous, 0)
        elif cleanup:
            for path in reversed(self._made):
                with contextlib.suppress(OSError):  # not empty: something else is there
                    path.unlink() if path == self.path else path.rmdir()
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def check_not_finished(manifest: dict, epochs: int, run: Path) -> None:
    """Resuming a run that already trained its `epochs` would train nothing and only rewrite
    its outputs: refused, naming the key that continues it."""
    if manifest.get("epoch_done") and manifest.get("epoch", 0) >= epochs:
        raise UsageError(f"--resume {run}: the run finished its {manifest['epoch']} epochs; "
                         f"give train.epochs={manifest['epoch'] + 1} or more to train on")


def resume_command(run: str | Path, world_size: int) -> str:
    """The command that continues `run`: the same number of ranks as the run had (a
    checkpoint resumes on its own world size)."""
    if world_size == 1:
        return f"python -m grape_dist.train --resume {run}"
    return (f"torchrun --nproc_per_node={world_size} -m grape_dist.train --resume {run} "
            "(or the same ranks over several nodes)")

