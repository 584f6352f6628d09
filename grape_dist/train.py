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
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .config import ConfigError, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m grape_dist.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML config (see configs/); defaults apply without one")
    p.add_argument("--out", help="folder for config.yaml, metrics.jsonl and summary.json")
    p.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=3 rule=dfa")
    # Intermixed: overrides may come before, between or after the flags.
    return p.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        # Refuse bad input before any rank or data is touched.
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
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

    with process_group(cfg.pipeline.timeout_s, device):
        summary = Trainer(cfg, args.out, device, layout).fit()
    ppl = (f", perplexity {summary['final_test_perplexity']:.3f} (best "
           f"{summary['best_test_perplexity']:.3f})" if "final_test_perplexity" in summary else "")
    logging.getLogger("grape_dist").info(
        "done: rule %s final test accuracy %.4f (best %.4f)%s, %d steps, %.1fs",
        summary["rule"], summary["final_test_accuracy"], summary["best_test_accuracy"], ppl,
        summary["steps"], summary["wall_seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
