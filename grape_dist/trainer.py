"""The training loop: data, model, stages, epochs, calibration, evaluation and run outputs."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from .config import Config, to_dict
from .data import epoch_batches, load_image_dataset, normalize, random_batch_indices, subset_indices
from .distributed import resolve_device
from .metrics.alignment import alignment_metrics
from .metrics.progress import Progress
from .metrics.writer import RunWriter, atomic_save
from .models import BlockModel, build_model
from .optim import scheduled_lr, set_lr
from .runtime import LocalPipeline, build_stages, split_micro_batches

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


def num_blocks(cfg: Config) -> int:
    """Blocks of the configured model, known before anything is built (mesh checks)."""
    extra = 2 if cfg.model.name == "lenet" else 0
    return extra + len(cfg.model.hidden) + 1


def build_pipeline(cfg: Config, model: BlockModel):
    """The runtime for this process: all blocks in one stage, or this rank's stage of the mesh
    when launched with several ranks. Returns (pipeline, mesh or None)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        n = len(model.blocks)
        return LocalPipeline(build_stages(cfg, model, [(0, n)]), cfg.pipeline.micro_batches), None
    from .distributed.mesh import Mesh, check_mesh
    from .distributed.partition import block_costs, partition
    from .distributed.pipeline import DistributedPipeline

    p = cfg.pipeline
    pp, dp = check_mesh(dist.get_world_size(), p.pp, p.dp, len(model.blocks))
    mesh = Mesh.create(pp, dp)
    costs = None
    if not p.stage_blocks and p.balance == "time":
        # Measured costs differ from rank to rank: use rank 0's, so all agree on the split.
        t = torch.tensor(block_costs(model, "time"), dtype=torch.float64,
                         device=next(model.parameters()).device)
        dist.broadcast(t, 0)
        costs = t.tolist()
    bounds = partition(model, pp, p.balance, p.stage_blocks, costs)
    first, last = bounds[mesh.stage]
    stage = build_stages(cfg, model, bounds, only=mesh.stage)[0]
    log.info("mesh pp=%d x dp=%d; stage blocks %s; rank %d holds blocks %d..%d", pp, dp,
             [b - a for a, b in bounds], mesh.rank, first, last - 1)
    if p.schedule != "native":
        from .distributed.torch_schedules import TorchScheduledPipeline
        from .optim import build_optimizer
        return TorchScheduledPipeline(
            stage, mesh, p.micro_batches, model.num_classes, model, p.schedule,
            cfg.data.batch_size, lambda ps: build_optimizer(ps, cfg.optim)), mesh
    return DistributedPipeline(stage, mesh, p.micro_batches, model.num_classes), mesh


class Trainer:
    """The training loop over any runtime: the single-process pipeline (one stage) or this
    rank's stage of the distributed pipeline. Only rank 0 writes outputs and logs."""

    def __init__(self, cfg: Config, out_dir: str | Path | None = None,
                 device: torch.device | None = None) -> None:
        self.cfg = cfg
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.out_dir = Path(out_dir) if out_dir is not None and self.rank == 0 else None
        self.writer = RunWriter(self.out_dir)
        self.writer.config(to_dict(cfg))
        t0 = time.perf_counter()
        self.train, self.test, input_shape, num_classes, source = load_tensors(cfg)
        log.info("data %s: %d train / %d test from %s (%.1fs)", cfg.data.name, len(self.train.y),
                 len(self.test.y), source, time.perf_counter() - t0)
        # Every rank builds the whole model from the same seed, then keeps its own blocks.
        torch.manual_seed(cfg.seed)
        self.model: BlockModel = build_model(cfg.model.name, input_shape, num_classes,
                                             cfg.model.hidden, cfg.model.channels,
                                             cfg.model.activation)
        # The data stays on the CPU; mini-batches move to the model's device as they are used.
        self.device = device if device is not None else resolve_device(cfg.train.device)
        self.model.to(self.device)
        self.pipeline, self.mesh = build_pipeline(cfg, self.model)
        self.stages = self.pipeline.stages
        self.dp = self.mesh.dp if self.mesh else 1
        self.replica = self.mesh.replica if self.mesh else 0
        probe = subset_indices(len(self.train.y), min(cfg.train.probe_batch_size,
                                                      len(self.train.y)), cfg.seed + 1)
        self.probe = Tensors(self.train.x[probe].to(self.device),
                             self.train.y[probe].to(self.device))
        self.state = TrainState()

    # -- evaluation ------------------------------------------------------------------------

    def evaluate(self, data: Tensors) -> tuple[float, float]:
        loss, correct = self.pipeline.evaluate(data.x, data.y, self.cfg.data.eval_batch_size)
        return loss / len(data.y), correct / len(data.y)

    def _replica_rows(self, idx: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """This replica's share of a global mini-batch: (indices, row offset, global size)."""
        start, size = split_micro_batches(len(idx), self.dp)[self.replica]
        return idx[start:start + size], start, len(idx)

    # -- training --------------------------------------------------------------------------

    def calibration_due(self, epoch: int) -> bool:
        t = self.cfg.calibration.every_epochs
        return t > 0 and epoch % t == 0

    def calibrate(self, epoch: int) -> None:
        """One exact BP step on one random mini-batch (Algorithm 1, step 4)."""
        bs = min(self.cfg.calibration.batch_size * self.dp, len(self.train.y))
        idx = random_batch_indices(len(self.train.y), bs, self.cfg.seed, epoch)
        rows, offset, total = self._replica_rows(idx)
        self.pipeline.calibrate(self.train.x[rows].to(self.device),
                                self.train.y[rows].to(self.device), self.state.step, offset, total)
        self.state.calibrations.append(CalibrationEvent(epoch, self.state.step, len(idx)))

    def train_epoch(self, epoch: int) -> tuple[float, float, dict[str, float]]:
        cfg = self.cfg
        # Torch's pipelining schedules need equal micro-batch shapes: drop a partial batch.
        batches = epoch_batches(len(self.train.y), cfg.data.batch_size * self.dp, cfg.seed, epoch,
                                drop_last=cfg.pipeline.schedule != "native")
        bar = Progress(len(batches), f"epoch {epoch}/{cfg.train.epochs}",
                       cfg.train.progress and self.rank == 0)
        loss = correct = seen = 0
        stats_sum: dict[str, float] = {}
        for idx in batches:
            rows, offset, total = self._replica_rows(idx)
            r = self.pipeline.train_step(self.train.x[rows].to(self.device),
                                         self.train.y[rows].to(self.device), self.state.step,
                                         offset, total)
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
            feedback = self.pipeline.gather_model(self.model)
            align = {}
            if self.rank == 0:
                align = alignment_metrics(self.model, feedback, self.probe.x, self.probe.y,
                                          cfg.seed)
            stats = self.pipeline.merge_stats(stats)
            for k, v in stats.items():
                name = names[int(k.split("/")[1])]
                if k.startswith("align_cos/") and name in align:
                    align[name]["train_col_cos"] = v
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
            "pp": self.mesh.pp if self.mesh else 1,
            "dp": self.dp,
            "wall_seconds": round(time.perf_counter() - t0, 3),
        }
        self.writer.summary(summary)
        if cfg.train.save_final:
            self.save_final()
        return summary

    def save_final(self) -> None:
        """Rank 0 writes the full model and feedback matrices to `final_state.pt` atomically."""
        feedback = self.pipeline.gather_model(self.model)
        if self.out_dir is None:
            return
        # Parameters only: they are what the stages gathered (FA's fixed matrices, for
        # instance, exist only on the rank that uses them).
        params = {k: v.detach().cpu() for k, v in self.model.named_parameters()}
        state = {"model": params, "feedback": {i: b.cpu() for i, b in feedback.items()},
                 "step": self.state.step, "epoch": self.state.epoch}
        atomic_save(state, self.out_dir / "final_state.pt")
