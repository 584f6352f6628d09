r"""Run the trainer as a Ray Train job: the same config, run folder and results as torchrun.

    # a local Ray (started here) with 2 CPU workers, gloo
    python -m grape_dist.ray_job --config configs/mnist_mlp_grape.yaml --num-workers 2 \
        --out runs/ray_mlp
    # on a cluster started with `ray start --head` (and workers joined), GPUs and nccl
    ray job submit --working-dir . -- python -m grape_dist.ray_job \
        --config configs/cifar100_resnet20_grape.yaml --num-workers 8 --use-gpu \
        --out /shared/runs/r20 data.root=/shared/data

Ray Train's `TorchTrainer` starts `--num-workers` workers and their process group (gloo on CPU,
nccl with `--use-gpu`); each worker is one rank of the pp x dp mesh and runs the ordinary
`Trainer`. Every checkpoint the trainer writes (`<out>/checkpoints/`, see
runtime/checkpoint.py) is also reported to Ray (`ray.train.report`, from rank 0: the folder
already holds every rank's shard, so `--out` must be on storage all workers share, as for
multi-node torchrun). When a worker fails, `FailureConfig(max_failures)` restarts the group and
the trainer resumes from the checkpoint Ray hands back (`ray.train.get_checkpoint`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from .config import load_config, to_dict


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m grape_dist.ray_job", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (see configs/)")
    p.add_argument("--num-workers", type=int, default=1, help="Ray Train workers = ranks")
    p.add_argument("--use-gpu", action="store_true", help="one GPU per worker, nccl")
    p.add_argument("--out", help="run folder (shared by all workers)")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.add_argument("--max-failures", type=int, default=0,
                   help="worker-group restarts Ray may make (each resumes from the last "
                        "checkpoint)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: the RAY_ADDRESS of `ray job submit`, "
                        "else a local Ray started here)")
    p.add_argument("--quiet", action="store_true", help="warnings only")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=3")
    return p.parse_intermixed_args(argv)


def _worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker: a rank of the mesh running the ordinary trainer."""
    import logging

    import ray.train
    import ray.train.torch

    from .build import plan_run
    from .config import load_config_dict
    from .trainer import Trainer

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    level = logging.WARNING if loop_config["quiet"] or rank else logging.INFO
    logging.basicConfig(level=level, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    # Ray configures its workers' root logger first (basicConfig is then a no-op): set our
    # logger's level itself, so ranks other than 0 print warnings only, as under torchrun.
    logging.getLogger("grape_dist").setLevel(level)
    cfg = load_config_dict(loop_config["config"])
    device = ray.train.torch.get_device()
    layout = plan_run(cfg, world, device)
    out = Path(loop_config["out"]) if loop_config["out"] else None
    restored = ray.train.get_checkpoint()
    if restored is None:
        trainer = Trainer(cfg, out, device, layout, overwrite=loop_config["overwrite"])
    else:
        # A restart after a failure: continue from the checkpoint Ray persisted (its folder
        # holds the manifest at the top). The trainer reads it while the folder exists.
        with restored.as_directory() as folder:
            trainer = Trainer(cfg, out, device, layout, resume=Path(folder))

    def report(path: Path | None) -> None:
        # Every rank calls report the same number of times; rank 0's folder has all shards.
        state = trainer.state
        checkpoint = ray.train.Checkpoint.from_directory(str(path)) \
            if path is not None and rank == 0 else None
        ray.train.report({"epoch": state.epoch, "step": state.step}, checkpoint=checkpoint)

    trainer.checkpoints.hook = report
    summary = trainer.fit()
    if rank == 0 and out is not None:
        log = logging.getLogger("grape_dist")
        log.info("ray job done: %s", json.dumps({k: summary[k] for k in (
            "final_test_accuracy", "steps", "world_size")}))


def main(argv: list[str] | None = None) -> int:
    from .errors import StartupError
    from .run_folder import RunLock, prepare_output

    args = parse_args(argv)
    if args.num_workers < 1:
        print("error: --num-workers must be >= 1", file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
        # Workers run in Ray's own folders: make every path absolute first.
        if args.out:
            args.out = str(Path(args.out).resolve())
        if cfg.data.root:
            cfg.data.root = str(Path(cfg.data.root).expanduser().resolve())
        args.resume = None
        prepare_output(args)
        if args.out:
            # The driver holds the folder for the job's lifetime (its workers write into it).
            lock = RunLock(Path(args.out))
            lock.acquire()
        import torch

        from .build import plan_run

        plan_run(cfg, args.num_workers, torch.device("cuda" if args.use_gpu else "cpu"))
    except StartupError as exc:
        print(f"{exc.prefix}: {exc}", file=sys.stderr)
        return 2

    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        address = args.address or os.environ.get("RAY_ADDRESS")
        env = {"env_vars": {k: v for k, v in os.environ.items()
                            if k.startswith("GRAPE_") or k == "HF_HOME"}}
        if address:
            ray.init(address=address, runtime_env=env, log_to_driver=not args.quiet)
        else:
            ray.init(num_cpus=max(args.num_workers, os.cpu_count() or 1),
                     include_dashboard=False, runtime_env=env, log_to_driver=not args.quiet)
    storage = str(Path(args.out) / "ray") if args.out else None
    trainer = TorchTrainer(
        _worker,
        train_loop_config={"config": to_dict(cfg), "out": args.out, "quiet": args.quiet,
                           "overwrite": args.overwrite},
        torch_config=TorchConfig(backend="nccl" if args.use_gpu else "gloo",
                                 timeout_s=int(cfg.pipeline.timeout_s)),
        scaling_config=ScalingConfig(num_workers=args.num_workers, use_gpu=args.use_gpu),
        run_config=RunConfig(name="grape_dist", storage_path=storage,
                             failure_config=FailureConfig(max_failures=args.max_failures),
                             # Ray's copies follow the run's own retention.
                             checkpoint_config=CheckpointConfig(
                                 num_to_keep=cfg.train.keep_checkpoints)),
    )
    result = trainer.fit()
    if result.error is not None:
        print(f"error: the Ray job failed: {result.error}", file=sys.stderr)
        return 1
    if args.out:
        summary = json.loads((Path(args.out) / "summary.json").read_text())
        print(f"done: rule {summary['rule']} final test accuracy "
              f"{summary['final_test_accuracy']:.4f}, {summary['steps']} steps on "
              f"{summary['world_size']} Ray workers; run folder {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
