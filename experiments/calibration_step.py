r"""What one calibration step does to a model trained by a direct rule (issue 17).

Trains `--config` (plus overrides) for `--epochs` epochs without calibrating, in one process,
then, from the same trained weights each time, applies one calibration step of every form in
`--forms` and reports:

- the training loss (eval mode, on a fixed subset of the training set) before and after;
- per block: the weights' norm |W|, one training step's update |dW_train| (the direct rule's,
  measured by taking one more step and undoing it), the exact gradient's norm on the
  calibration batch |g| and the calibration's update |dW_cal|, with |dW_cal| / |W|.

    GRAPE_DATA_DIR=../shared/data python experiments/calibration_step.py \
        --config configs/cifar100_resnet20_grape.yaml --epochs 2 \
        data.name=cifar10 data.train_subset=10000

A form is a list of `calibration.*` overrides joined by '+', e.g.
`form=paper+max_update=0+line_search=0` (the paper's step) or `form=optimizer`; `--forms` separates
forms by ','.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import math
import sys
import time

import torch

from grape_dist.config import load_config
from grape_dist.data.sampling import subset_indices
from grape_dist.trainer import Tensors, Trainer

DEFAULT_FORMS = ",".join([
    "form=paper+max_update=0+line_search=0",  # the paper's step
    "form=paper+line_search=0",  # the trust bound alone
    "form=paper",  # the default: bounded and checked
    "form=optimizer+max_update=0+line_search=0",
    "form=optimizer",
])


def snapshot(trainer: Trainer) -> tuple[dict, list[dict]]:
    """Weights, buffers and the weights' optimiser states (B and its optimiser are untouched
    by a calibration)."""
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return weights, [copy.deepcopy(o.state_dict()) for o in trainer.engine.optimizers]


def restore(trainer: Trainer, snap: tuple[dict, list[dict]]) -> None:
    trainer.model.load_state_dict(snap[0])
    for opt, state in zip(trainer.engine.optimizers, snap[1]):
        opt.load_state_dict(copy.deepcopy(state))


def block_norms(trainer: Trainer, before: dict, after: dict | None = None) -> dict[str, float]:
    """Per block: |W| of `before`, or |after - before| when `after` is given (weights only, no
    BatchNorm statistics)."""
    out: dict[str, float] = {}
    params = {n for n, _ in trainer.model.named_parameters()}
    for name in params:
        block = ".".join(name.split(".")[:2])
        v = before[name] if after is None else after[name] - before[name]
        out[block] = out.get(block, 0.0) + float(v.double().pow(2).sum())
    return {k: math.sqrt(v) for k, v in out.items()}


@torch.no_grad()
def batch_stat_loss(trainer: Trainer, rows: Tensors, chunk: int = 500) -> float:
    """The mean loss on `rows` with BatchNorm normalising by each chunk's own statistics
    instead of the running ones (running statistics left as they are): tells a BatchNorm
    train/eval gap from damage to the weights."""
    model = trainer.model
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(m.training, m.momentum) for m in bns]
    for m in bns:
        m.train()
        m.momentum = 0.0  # running = 1 * running + 0 * batch: unchanged
    total, n = 0.0, 0
    for start in range(0, len(rows.y), chunk):
        x, y = trainer.inputs(rows.x[start:start + chunk]), rows.y[start:start + chunk].long()
        out = model(x)
        total += float(torch.nn.functional.cross_entropy(
            out.reshape(-1, out.shape[-1]), y.reshape(-1), reduction="sum"))
        n += y.numel()
    for m, (training, momentum) in zip(bns, saved):
        m.train(training)
        m.momentum = momentum
    return total / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--forms", default=DEFAULT_FORMS)
    p.add_argument("--loss_rows", type=int, default=2000,
                   help="training rows the loss is measured on (eval mode)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    # Calibration rules exist (every_epochs > 0) but the loop below never calls them while
    # training.
    cfg = load_config(args.config, [*args.overrides, f"train.epochs={args.epochs}",
                                    "calibration.every_epochs=1", "train.progress=false",
                                    f"train.threads={args.threads}"])
    print(f"# command: python {' '.join(sys.argv)}")
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    trainer = Trainer(cfg)
    idx = subset_indices(len(trainer.train.y), min(args.loss_rows, len(trainer.train.y)),
                         cfg.seed + 7)
    rows = Tensors(trainer.train.x[idx], trainer.train.y[idx])
    from grape_dist.optim import scheduled_lr, set_lr

    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        trainer.state.epoch = epoch
        for opt in trainer.engine.optimizers:
            set_lr(opt, scheduled_lr(cfg.optim, epoch, cfg.train.epochs))
        loss, acc, _ = trainer.train_epoch(epoch)
        test_loss, test_acc = trainer.evaluate(trainer.test)
        trainer.state.progress = type(trainer.state.progress)()
        print(f"epoch {epoch}: train loss {loss:.3f} acc {100 * acc:.2f} (during the epoch), "
              f"test loss {test_loss:.3f} acc {100 * test_acc:.2f}, test loss with batch "
              f"statistics {batch_stat_loss(trainer, trainer.test):.3f} "
              f"({time.perf_counter() - t0:.0f} s)")
    base = snapshot(trainer)
    loss0, acc0 = trainer.evaluate(rows)
    w_norm = block_norms(trainer, base[0])
    # One more training step of the direct rule, undone: the size of its update.
    batch = torch.arange(cfg.data.batch_size)
    trainer.engine.train_step(*trainer.data.training_rows(batch, args.epochs), trainer.state.step)
    d_train = block_norms(trainer, base[0], snapshot(trainer)[0])
    restore(trainer, base)
    print(f"\ntraining loss on {len(idx)} training rows (eval mode) before calibrating: "
          f"{loss0:.4f} (accuracy {100 * acc0:.2f}); with batch statistics in BatchNorm: "
          f"{batch_stat_loss(trainer, rows):.4f}")
    results = {}
    for form in args.forms.split(","):
        sub = load_config(args.config, [*args.overrides, "calibration.every_epochs=1",
                                        *[f"calibration.{o}" for o in form.split("+")]])
        trainer.cfg = dataclasses.replace(cfg, calibration=sub.calibration)
        restore(trainer, base)
        rebuild_calibration(trainer, sub)
        trainer.calibrate(args.epochs)
        after = snapshot(trainer)
        loss1, acc1 = trainer.evaluate(rows)
        results[form] = (loss1, acc1, block_norms(trainer, base[0], after[0]))
        bstat = batch_stat_loss(trainer, rows)
        restore(trainer, base)
        print(f"after one calibration, {form:>32}: loss {loss1:.4f} ({loss1 / loss0:.2f}x), "
              f"accuracy {100 * acc1:.2f}; with batch statistics {bstat:.4f}")
    print("\nper block: |W|, one training step's |dW|, and each form's calibration |dW| "
          "(÷ |W|)")
    forms = list(results)
    print(f"{'block':>10} {'|W|':>9} {'|dW_train|':>11} " +
          " ".join(f"{f:>26}" for f in forms))
    for block in sorted(w_norm, key=lambda b: [int(x) if x.isdigit() else x
                                               for x in b.split(".")]):
        cells = [f"{results[f][2][block]:9.4f} ({results[f][2][block] / w_norm[block]:.1e})"
                 for f in forms]
        print(f"{block:>10} {w_norm[block]:9.3f} {d_train[block]:11.4f} " +
              " ".join(f"{c:>26}" for c in cells))


def rebuild_calibration(trainer: Trainer, cfg) -> None:
    """Rebuild every stage's calibration rule for `cfg`'s calibration form, in place (one
    process: every stage is local)."""
    from grape_dist.rules import build_calibration_rule

    for stage in trainer.engine.stages:
        stage.calibration = build_calibration_rule(cfg, trainer.engine.model, stage.first,
                                                   stage.last, rule=stage.rule)


if __name__ == "__main__":
    main()
