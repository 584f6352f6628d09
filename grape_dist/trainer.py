"""The training loop: data, model, stages, epochs, calibration, evaluation and run outputs."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .config import Config, to_dict
from .data import epoch_batches, load_image_dataset, normalize, random_batch_indices, subset_indices
from .metrics.alignment import alignment_metrics
from .metrics.progress import Progress
from .metrics.writer import RunWriter
from .models import BlockModel, build_model
from .optim import scheduled_lr, set_lr
from .runtime import LocalPipeline, build_stages

log = logging.getLogger("grape_dist")


@dataclass
class Tensors:
    x: torch.Tensor  # float, normalised
    y: torch.Tensor


@dataclass
class CalibrationEvent:
    epoch: int
    step: int
    batch_size: int


@dataclass
class TrainState:
    epoch: int = 0
    step: int = 0
    calibrations: list[CalibrationEvent] = field(default_factory=list)
    best_test_accuracy: float = 0.0


def load_tensors(cfg: Config) -> tuple[Tensors, Tensors, tuple[int, ...], int, str]:
    ds = load_image_dataset(cfg.data.name, cfg.data.root)
    splits = []
    for split, n in ((ds.train, cfg.data.train_subset), (ds.test, cfg.data.test_subset)):
        images, labels = split.images, split.labels
        if n:
            idx = subset_indices(len(labels), n, cfg.seed)
            images, labels = images[idx], labels[idx]
        splits.append(Tensors(normalize(images, ds.mean, ds.std), labels))
    return splits[0], splits[1], ds.input_shape, ds.num_classes, ds.source


class Trainer:
    """Single-process trainer: the pipeline with one stage (multi-rank runtimes reuse Stage)."""

    def __init__(self, cfg: Config, out_dir: str | Path | None = None, world_size: int = 1) -> None:
        self.cfg = cfg
        self.world_size = world_size
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.writer = RunWriter(out_dir)
        self.writer.config(to_dict(cfg))
        t0 = time.perf_counter()
        self.train, self.test, input_shape, num_classes, source = load_tensors(cfg)
        log.info("data %s: %d train / %d test from %s (%.1fs)", cfg.data.name, len(self.train.y),
                 len(self.test.y), source, time.perf_counter() - t0)
        torch.manual_seed(cfg.seed)
        self.model: BlockModel = build_model(cfg.model.name, input_shape, num_classes,
                                             cfg.model.hidden, cfg.model.channels,
                                             cfg.model.activation)
        n = len(self.model.blocks)
        self.stages = build_stages(cfg, self.model, [(0, n)])
        self.pipeline = LocalPipeline(self.stages, cfg.pipeline.micro_batches)
        probe = subset_indices(len(self.train.y), min(cfg.train.probe_batch_size,
                                                      len(self.train.y)), cfg.seed + 1)
        self.probe = Tensors(self.train.x[probe], self.train.y[probe])
        self.state = TrainState()

    # -- evaluation ------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, data: Tensors) -> tuple[float, float]:
        loss, correct = 0.0, 0
        bs = self.cfg.data.eval_batch_size
        for start in range(0, len(data.y), bs):
            logits = self.pipeline.infer(data.x[start:start + bs])
            y = data.y[start:start + bs]
            loss += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(1) == y).sum())
        return loss / len(data.y), correct / len(data.y)

    def feedback(self) -> dict[int, torch.Tensor]:
        out: dict[int, torch.Tensor] = {}
        for s in self.stages:
            out.update(s.rule.feedback_matrices())
        return out

    # -- training --------------------------------------------------------------------------

    def calibration_due(self, epoch: int) -> bool:
        t = self.cfg.calibration.every_epochs
        return t > 0 and epoch % t == 0

    def calibrate(self, epoch: int) -> None:
        """One exact BP step on one random mini-batch (Algorithm 1, step 4)."""
        bs = min(self.cfg.calibration.batch_size, len(self.train.y))
        idx = random_batch_indices(len(self.train.y), bs, self.cfg.seed, epoch)
        self.pipeline.calibrate(self.train.x[idx], self.train.y[idx], self.state.step)
        self.state.calibrations.append(CalibrationEvent(epoch, self.state.step, len(idx)))

    def train_epoch(self, epoch: int) -> tuple[float, float, dict[str, float]]:
        cfg = self.cfg
        batches = epoch_batches(len(self.train.y), cfg.data.batch_size, cfg.seed, epoch)
        bar = Progress(len(batches), f"epoch {epoch}/{cfg.train.epochs}", cfg.train.progress)
        loss = correct = seen = 0
        stats_sum: dict[str, float] = {}
        for idx in batches:
            r = self.pipeline.train_step(self.train.x[idx], self.train.y[idx], self.state.step)
            self.state.step += 1
            loss += r.loss_sum
            correct += r.correct
            seen += r.samples
            for k, v in r.stats.items():
                stats_sum[k] = stats_sum.get(k, 0.0) + v
            bar.update(loss=loss / seen, acc=correct / seen)
        bar.close()
        return loss / seen, correct / seen, {k: v / len(batches) for k, v in stats_sum.items()}

    def fit(self) -> dict:
        cfg = self.cfg
        t0 = time.perf_counter()
        names = [b.name for b in self.model.blocks]
        test_loss = test_acc = float("nan")
        for epoch in range(1, cfg.train.epochs + 1):
            self.state.epoch = epoch
            t_epoch = time.perf_counter()
            lr = scheduled_lr(cfg.optim, epoch, cfg.train.epochs)
            for stage in self.stages:
                set_lr(stage.rule.optimizer, lr)
            train_loss, train_acc, stats = self.train_epoch(epoch)
            calibrated = self.calibration_due(epoch)
            if calibrated:
                self.calibrate(epoch)
            if epoch % cfg.train.eval_every and epoch != cfg.train.epochs:
                continue
            test_loss, test_acc = self.evaluate(self.test)
            self.state.best_test_accuracy = max(self.state.best_test_accuracy, test_acc)
            align = alignment_metrics(self.model, self.feedback(), self.probe.x, self.probe.y,
                                      cfg.seed)
            train_align = {names[int(k.split("/")[1])]: v for k, v in stats.items()
                           if k.startswith("align_cos/")}
            for name, v in train_align.items():
                align.setdefault(name, {})["train_col_cos"] = v
            base = {"epoch": epoch, "step": self.state.step}
            self.writer.metrics({**base, "split": "train", "loss": train_loss,
                                 "accuracy": train_acc})
            self.writer.metrics({**base, "split": "test", "loss": test_loss,
                                 "accuracy": test_acc, "alignment": align})
            cos = " ".join(f"{n}:{v['grad_cos']:.2f}" for n, v in align.items())
            log.info("epoch %d/%d step %d | train loss %.4f acc %.4f | test loss %.4f acc %.4f%s"
                     "%s | %.1fs", epoch, cfg.train.epochs, self.state.step, train_loss,
                     train_acc, test_loss, test_acc, f" | cos(B^T e, grad) {cos}" if cos else "",
                     " | calibrated" if calibrated else "", time.perf_counter() - t_epoch)
        summary = {
            "rule": cfg.rule,
            "model": cfg.model.name,
            "dataset": cfg.data.name,
            "final_test_accuracy": test_acc,
            "final_test_loss": test_loss,
            "best_test_accuracy": self.state.best_test_accuracy,
            "epochs": cfg.train.epochs,
            "steps": self.state.step,
            "calibration_steps": len(self.state.calibrations),
            "world_size": self.world_size,
            "pp": len(self.stages),
            "dp": 1,
            "wall_seconds": round(time.perf_counter() - t0, 3),
        }
        self.writer.summary(summary)
        return summary
