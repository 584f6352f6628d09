r"""Train a model with BP, FA, DFA, DRTP, PEPITA or GrAPE.

    # one process (the embedded MNIST copy needs no network or data folder)
    python -m grape_dist.train --config configs/mnist_mlp_grape.yaml --out runs/mlp_grape
    # dotted overrides after the flags
    python -m grape_dist.train --config configs/mnist_mlp_grape.yaml train.epochs=3 rule=dfa
    # a pipeline of 3 ranks, one stage each (blocks split by parameter count)
    torchrun --nproc_per_node=3 -m grape_dist.train --config configs/mnist_mlp_grape.yaml
    # 2 stages x 2 data-parallel replicas, 4 micro-batches per mini-batch
    torchrun --nproc_per_node=4 -m grape_dist.train --config configs/mnist_mlp_grape.yaml \
        pipeline.dp=2 pipeline.micro_batches=4
    # the BP baseline on torch's zero-bubble V schedule (two stages per rank)
    torchrun --nproc_per_node=2 -m grape_dist.train --config configs/mnist_mlp_bp.yaml \
        pipeline.schedule=zbv pipeline.micro_batches=4 data.drop_last=true

Data other than the embedded MNIST is read from `data.root` or $GRAPE_DATA_DIR (a folder in the
Hugging Face hub's parquet layout), else from the hub when online.

Checkpoints go to <out>/checkpoints/ at every epoch end (and every `train.checkpoint_every_steps`
steps). Ctrl-C (SIGINT) or SIGTERM finishes the current step, writes a checkpoint and exits;
    python -m grape_dist.train --resume runs/mlp_grape      # continues it (same ranks)
An existing run folder is never overwritten silently: --resume it or pass --overwrite.

--trace [DIR] writes a timeline per rank (DIR, default <out>/trace/: trace_rank<R>.json, for
Perfetto or `python -m grape_dist.report timeline DIR`) of --trace-steps steps (20) after
--trace-skip warm-up steps (5); docs/pipeline.md, Timelines.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

from .config import load_config, load_config_dict
from .errors import StartupError, UsageError
from .faults import fault_from_env
from .run_folder import (
    RunLock,
    check_not_finished,
    mark_launch,
    prepare_output,
    resume_after_restart,
    resume_command,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m grape_dist.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (see configs/); defaults apply without one")
    p.add_argument("--out", help="folder for config.yaml, metrics.jsonl and summary.json")
    p.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue the run in RUN_DIR from its newest checkpoint (its own "
                        "config.yaml; overrides may change only train.epochs and the like)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (its metrics, checkpoints, ...)")
    p.add_argument("--trace", nargs="?", const="", metavar="DIR",
                   help="write a timeline per rank (Chrome/Perfetto JSON, DIR/trace_rank<R>.json"
                        "; DIR defaults to <out>/trace); see docs/pipeline.md, Timelines")
    p.add_argument("--trace-steps", type=int, default=20, metavar="N",
                   help="with --trace: record N steps (default 20)")
    p.add_argument("--trace-skip", type=int, default=5, metavar="N",
                   help="with --trace: after the first N steps (warm-up; default 5)")
    # The deepspeed launcher passes --local_rank (its environment has RANK and WORLD_SIZE).
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=3 rule=dfa")
    # Intermixed: overrides may come before, between or after the flags.
    return p.parse_intermixed_args(argv)


# Rank 0 reports an error every rank finds; the others give it this long to do so (torchrun
# stops them as soon as rank 0 exits) before reporting an error of their own.
PEER_REPORT_GRACE_S = 20.0


def launcher_env() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) from the launcher's environment; (0, 1) without one."""
    values = []
    for key, default in (("RANK", "0"), ("WORLD_SIZE", "1")):
        raw = os.environ.get(key, default)
        try:
            values.append(int(raw))
        except ValueError:
            raise UsageError(f"{key}={raw!r} in the environment is not an integer: unset it, or "
                             "launch with torchrun, which sets it") from None
    rank, world_size = values
    if world_size < 1 or not 0 <= rank < world_size:
        raise UsageError(f"RANK={rank} does not fit WORLD_SIZE={world_size} in the environment: "
                         "unset both, or launch with torchrun, which sets them")
    return rank, world_size


def trace_folder(args: argparse.Namespace) -> Path | None:
    """Where --trace writes (None: not tracing): its DIR, else <out>/trace."""
    if args.trace is None:
        return None
    if args.trace_steps < 1 or args.trace_skip < 0:
        raise UsageError(f"--trace-steps must be >= 1 and --trace-skip >= 0, got "
                         f"{args.trace_steps} and {args.trace_skip}")
    if args.trace and "=" in args.trace:
        raise UsageError(f"--trace took {args.trace!r} as its folder: put the overrides before "
                         "--trace, or give a folder (--trace DIR)")
    if args.trace:
        return Path(args.trace)
    if not args.out:
        raise UsageError("--trace without a folder writes to <out>/trace: give --out or "
                         "--trace DIR")
    return Path(args.out) / "trace"


@contextlib.contextmanager
def _saving_trace(trace) -> Iterator[None]:
    """Write this rank's timeline when training ends, also when it fails (whatever was
    recorded; a no-op without --trace)."""
    try:
        yield
    finally:
        path = trace.save()
        if path is not None:
            logging.getLogger("grape_dist").info("timeline: %s", path)


def refuse(exc: StartupError, rank: int, world_size: int) -> int:
    """One line for a run that cannot start, exit code 2. Inside the group the ranks compare
    their checks (RankFailures) and rank 0 speaks for all. Before it, every rank checks the same
    inputs, so rank 0 speaks for all too; another rank speaks only if it is still running after
    a grace period (torchrun stops it once rank 0 exits), i.e. the error was its own."""
    if rank != 0 and exc.agreed:
        return 2  # every rank knows (they compared notes); rank 0 says it
    if rank != 0 and world_size > 1:
        time.sleep(PEER_REPORT_GRACE_S)
        print(f"{exc.prefix} (rank {rank}): {exc}", file=sys.stderr, flush=True)
    else:
        print(f"{exc.prefix}: {exc}", file=sys.stderr, flush=True)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    rank, world_size = 0, 1
    try:
        rank, world_size = launcher_env()
        fault_from_env()  # a malformed GRAPE_FAULT is refused here, not at its step
        resume_after_restart(args)
        resume = prepare_output(args)
        trace_dir = trace_folder(args)
        manifest = None
        if resume is not None:
            # A resumed run goes on with the config its checkpoint was trained with (config.yaml
            # keeps the one it started with; resumes.jsonl, the changes since).
            from .runtime.checkpoint import read_manifest

            manifest = read_manifest(resume, verify=False)
            cfg = load_config_dict(manifest["config"], args.overrides)
        else:
            cfg = load_config(args.config, args.overrides)
        from .build import plan_run
        from .distributed import resolve_device

        device = resolve_device(cfg.train.device)
        # The layout is checked here, by every rank alike, before any joins the group.
        layout = plan_run(cfg, world_size, device)
        if manifest is not None:
            # Another world size or config is refused before the group; the trainer verifies
            # the files' checksums once the group is up.
            from .runtime.checkpoint import check_resumable

            check_resumable(manifest, cfg, layout)
            check_not_finished(manifest, cfg.train.epochs, Path(args.resume))
        # Rank 0 writes the run: a second run into this folder is refused here, the lock held
        # until this process exits.
        lock = RunLock(Path(args.out)) if rank == 0 and args.out else None
        if lock is not None:
            lock.acquire()
    except StartupError as exc:
        return refuse(exc, rank, world_size)
    warnings.formatwarning = _one_line_warning
    logging.basicConfig(level=logging.WARNING if args.quiet or rank else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.quiet:
        cfg.train.progress = False
    if rank == 0 and not args.out:
        logging.getLogger("grape_dist").warning(
            "no --out: nothing of this run is saved (metrics, checkpoints, summary); give "
            "--out DIR to keep it")
    if args.quiet or rank:
        from .data.access import silence_progress_bars

        silence_progress_bars()

    from . import trace
    from .distributed import peer_failure, process_group
    from .trainer import NonFiniteError, Trainer, TrainingInterrupted

    if trace_dir is not None:
        trace.enable(trace_dir, rank, skip=args.trace_skip, steps=args.trace_steps,
                     device=device)
    trainer = None
    try:
        with process_group(cfg.pipeline.timeout_s, device), _saving_trace(trace):
            # Data, resume checks and stages: errors here still come before the first step.
            trainer = Trainer(cfg, args.out, device, layout, resume=resume,
                              overwrite=args.overwrite)
            if rank == 0 and args.out:
                mark_launch(Path(args.out))
            with stop_on_signals(trainer):
                summary = trainer.fit()
    except StartupError as exc:
        if lock is not None:
            lock.release(cleanup=True)  # a refused run leaves --out as it found it
        return refuse(exc, rank, world_size)
    except RuntimeError as exc:
        reason = peer_failure(exc) if world_size > 1 else None
        if reason is None:
            raise
        logging.getLogger("grape_dist").debug("the backend's error", exc_info=exc)
        # Whichever rank notices says so (rank 0 may be the one that died).
        print(f"error (rank {rank}): lost a peer {_where(trainer)} ({reason}; "
              f"pipeline.timeout_s={cfg.pipeline.timeout_s:g}); {_resume_hint(trainer, args)}",
              file=sys.stderr, flush=True)
        return 4
    except TrainingInterrupted as exc:
        if rank == 0:
            where = (f"checkpoint {exc.checkpoint}; resume with: "
                     f"{resume_command(args.out, world_size)}" if exc.checkpoint else
                     "no --out, so nothing was saved")
            print(f"stopped: {exc}; {where}", file=sys.stderr, flush=True)
        return 130
    except NonFiniteError as exc:
        if rank == 0:
            last = (f"the last good checkpoint is {exc.checkpoint} ("
                    f"{resume_command(args.out, world_size)} continues from it)"
                    if exc.checkpoint else "no checkpoint was written yet")
            print(f"error: {exc}; lower optim.lr (or grape.b_optim.lr); {last}",
                  file=sys.stderr, flush=True)
        return 3
    except KeyboardInterrupt:
        if rank == 0:
            print("stopped before training began; nothing to resume", file=sys.stderr)
        return 130
    finally:
        if lock is not None:
            lock.release()  # the run is over (a no-op if a refusal released it)
    ppl = (f", perplexity {summary['final_test_perplexity']:.3f} (best "
           f"{summary['best_test_perplexity']:.3f})" if "final_test_perplexity" in summary else "")
    logging.getLogger("grape_dist").info(
        "done: rule %s final test accuracy %.4f (best %.4f)%s, %d steps, %.1fs",
        summary["rule"], summary["final_test_accuracy"], summary["best_test_accuracy"], ppl,
        summary["steps"], summary["wall_seconds"])
    return 0


_default_formatwarning = warnings.formatwarning


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """Our own warnings (they start with "grape_dist:") as one line, without the source line
    Python adds; everyone else's as Python formats them."""
    if str(message).startswith("grape_dist:"):
        return f"warning: {message}\n"
    return _default_formatwarning(message, category, filename, lineno, line)


def _where(trainer) -> str:
    if trainer is None:
        return "while starting"
    return f"after step {trainer.state.step} (epoch {trainer.state.epoch})"


def _resume_hint(trainer, args: argparse.Namespace) -> str:
    saved = trainer.last_checkpoint if trainer is not None else None
    if saved is None:
        return "no checkpoint was written yet"
    return (f"the last checkpoint is {saved}: {resume_command(args.out, trainer.world_size)} "
            "continues from it (torchrun --max-restarts=N does so by itself)")


@contextlib.contextmanager
def stop_on_signals(trainer) -> Iterator[None]:
    """SIGINT and SIGTERM ask the trainer to stop after its current step (with a checkpoint);
    a second SIGINT interrupts at once. Only the main thread can install handlers (a Ray worker
    runs the loop in another thread): elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if signum == signal.SIGINT and trainer.stop_requested:
            raise KeyboardInterrupt
        trainer.request_stop()

    saved = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in saved.items():
            signal.signal(s, h)


if __name__ == "__main__":
    sys.exit(main())
