"""Train a model with BP, FA, DFA, DRTP, PEPITA or GrAPE.

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
        pipeline.schedule=zbv pipeline.micro_batches=4

Data other than the embedded MNIST is read from `data.root` or $GRAPE_DATA_DIR (a folder in the
Hugging Face hub's parquet layout), else from the hub when online.

Checkpoints go to <out>/checkpoints/ at every epoch end (and every `train.checkpoint_every_steps`
steps). Ctrl-C (SIGINT) or SIGTERM finishes the current step, writes a checkpoint and exits;
    python -m grape_dist.train --resume runs/mlp_grape      # continues it (same ranks)
An existing run folder is never overwritten silently: --resume it or pass --overwrite.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from .config import ConfigError, load_config


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
    # The deepspeed launcher passes --local_rank (its environment has RANK and WORLD_SIZE).
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=3 rule=dfa")
    # Intermixed: overrides may come before, between or after the flags.
    return p.parse_intermixed_args(argv)


# What marks a folder as holding a run, and what --overwrite removes.
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json")
RUN_FOLDERS = ("checkpoints", "final_state", "tensorboard")


class UsageError(Exception):
    """Bad command-line input: one line, exit code 2."""


def prepare_output(args: argparse.Namespace, rank: int) -> Path | None:
    """Check --out / --resume / --overwrite before anything runs; returns the checkpoint to
    resume from (None for a fresh run). With --overwrite, rank 0 removes the earlier run."""
    from .runtime.checkpoint import CheckpointError, latest_checkpoint

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
        try:
            ckpt = latest_checkpoint(run)
        except CheckpointError as exc:
            raise UsageError(f"--resume {run}: {exc}") from exc
        if ckpt is None:
            raise UsageError(f"--resume {run}: the run has no checkpoint to continue from "
                             f"({run / 'checkpoints'} is missing or empty)")
        args.out = str(run)
        return ckpt
    if not args.out:
        return None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    held = [name for name in (*RUN_FILES, *RUN_FOLDERS) if (out / name).exists()]
    if held and not args.overwrite:
        raise UsageError(f"--out {out} already holds a run ({', '.join(held)}): pass --resume "
                         f"{out} to continue it, --overwrite to replace it, or another --out")
    if held and rank == 0:
        for name in held:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    rank = int(os.environ.get("RANK", "0"))
    try:
        resume = prepare_output(args, rank)
        config_path = str(Path(args.resume) / "config.yaml") if args.resume else args.config
        cfg = load_config(config_path, args.overrides)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ConfigError as exc:
        # Refuse bad input before any rank or data is touched.
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    from .distributed import backend_for, process_group, resolve_device
    from .runtime import LayoutError, plan_layout
    from .trainer import Trainer, build_model_for

    try:
        device = resolve_device(cfg.train.device)
        # The layout is checked once, here, by every rank alike: all of them stop before
        # joining the process group. Block counts come from the model's own builder.
        layout = plan_layout(cfg, len(build_model_for(cfg).blocks), world_size,
                             backend_for(device))
    except (LayoutError, RuntimeError) as exc:
        # Every rank says it: torchrun may stop the others before rank 0 gets to print.
        where = f" (rank {rank})" if world_size > 1 else ""
        print(f"config error{where}: {exc}", file=sys.stderr, flush=True)
        return 2
    logging.basicConfig(level=logging.WARNING if args.quiet or rank else logging.INFO,
                        format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.quiet:
        cfg.train.progress = False

    from .data import DatasetUnavailableError
    from .runtime.checkpoint import CheckpointError
    from .trainer import NonFiniteError, TrainingInterrupted

    try:
        with process_group(cfg.pipeline.timeout_s, device):
            trainer = Trainer(cfg, args.out, device, layout, resume=resume)
            with stop_on_signals(trainer):
                summary = trainer.fit()
    except CheckpointError as exc:
        if rank == 0:
            print(f"error: cannot resume: {exc}", file=sys.stderr)
        return 2
    except DatasetUnavailableError as exc:
        # The message says where it looked and how to provide the data.
        if rank == 0:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingInterrupted as exc:
        if rank == 0:
            where = (f"checkpoint {exc.checkpoint}; resume with: python -m grape_dist.train "
                     f"--resume {args.out}" if exc.checkpoint else
                     "no --out, so nothing was saved")
            print(f"stopped: {exc}; {where}", file=sys.stderr, flush=True)
        return 130
    except NonFiniteError as exc:
        if rank == 0:
            last = (f"the last good checkpoint is {exc.checkpoint} (--resume {args.out} "
                    "continues from it)" if exc.checkpoint else "no checkpoint was written yet")
            print(f"error: {exc}; lower optim.lr (or grape.b_optim.lr); {last}",
                  file=sys.stderr, flush=True)
        return 3
    except KeyboardInterrupt:
        if rank == 0:
            print("stopped before training began; nothing to resume", file=sys.stderr)
        return 130
    ppl = (f", perplexity {summary['final_test_perplexity']:.3f} (best "
           f"{summary['best_test_perplexity']:.3f})" if "final_test_perplexity" in summary else "")
    logging.getLogger("grape_dist").info(
        "done: rule %s final test accuracy %.4f (best %.4f)%s, %d steps, %.1fs",
        summary["rule"], summary["final_test_accuracy"], summary["best_test_accuracy"], ppl,
        summary["steps"], summary["wall_seconds"])
    return 0


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
