"""The training loop: data, model, stages, epochs, calibration, evaluation and run outputs.

The rest of a run lives beside it, by concern: what it has done (train_state.py), the checks
before its first step (startup.py), how it stops early (stopping.py), its checkpoints
(checkpointing.py), and its folder and restart policy (run_folder.py)."""

from __future__ import annotations

import logging
import math
import random
import time
from pathlib import Path

import torch
import torch.distributed as dist

from .build import build_engine, build_model_for, plan_run
from .checkpointing import Checkpointer, Resume, read_resume
from .config import TEXT_DATASETS, Config, to_dict
from .data import epoch_batches, random_batch_indices
from .data.held import Tensors
from .data.rank_data import RankData, load_tensors
from .distributed import resolve_device
from .errors import StartupError
from .faults import fault_from_env
from .metrics.alignment import probe_alignment
from .metrics.progress import Progress
from .metrics.tensorboard import TensorBoardWriter
from .metrics.writer import RunWriter, clear_run
from .optim import scheduled_lr, set_lr, warmup_factor
from .runtime import CheckRows, Layout, split_micro_batches
from .runtime.checkpoint import config_changes, load_checkpoint
from .runtime.final_state import clear_final_state
from .startup import agree_to_start, check_fits_data, threads_per_process
from .stopping import NonFiniteError, TrainingInterrupted, nonfinite_blocks
from .train_state import CalibrationEvent, EpochProgress, TrainState

# Re-exported: the entry points and tests import them from here.
__all__ = ["NonFiniteError", "Tensors", "Trainer", "TrainingInterrupted", "build_model_for"]

log = logging.getLogger("grape_dist")


def _calibrated_note(event: CalibrationEvent | None) -> str:
    """The epoch line's account of a calibration: how much of the step was kept."""
    if event is None:
        return ""
    if event.loss_before is None:
        return " | calibrated"
    kept = "undone" if event.scale == 0 else f"{event.scale:g} of the step kept"
    return (f" | calibrated ({kept}; loss on the check rows {event.loss_before:.4f} -> "
            f"{event.loss_after:.4f})")


class Trainer:
    """The training loop over this process's `PipelineEngine`: every stage in one process, or
    this rank's stages of a pp x dp mesh. Only rank 0 writes outputs and logs."""

    def __init__(self, cfg: Config, out_dir: str | Path | None = None,
                 device: torch.device | None = None, layout: Layout | None = None,
                 resume: str | Path | None = None, overwrite: bool = False) -> None:
        """`resume`: a checkpoint folder (`runtime.checkpoint.latest_checkpoint` of a run) to
        continue from; its manifest must describe this config and layout. `overwrite`: remove
        the run already in `out_dir` once this one has its data and stages."""
        self.cfg = cfg
        # Every random draw the runtime makes is keyed (rng.py); the global streams are seeded
        # too, so anything drawing from them (a direct model call's dropout, a user's hook)
        # repeats from run to run.
        random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        threads = threads_per_process(cfg.train.threads)
        if threads:
            torch.set_num_threads(threads)
        self.device = device if device is not None else resolve_device(cfg.train.device)
        model = build_model_for(cfg)
        # The entry point validates the layout before joining the group; direct callers here.
        self.layout = layout or plan_run(cfg, self.world_size, self.device, model)
        self.out_path = Path(out_dir) if out_dir is not None else None
        self.out_dir = self.out_path if self.rank == 0 else None
        self.state = TrainState()
        self.fault = fault_from_env()  # injected faults for recovery tests (faults.py)
        resumed: Resume | None = None
        failure: StartupError | None = None
        try:
            if resume is not None:
                resumed = read_resume(resume, cfg, self.layout, self.rank, self.out_dir)
                self.state = resumed.state
            t0 = time.perf_counter()
            self._inject_fault("start")
            # The data stays on the CPU; mini-batches move to the model's device when used.
            train, test, source = load_tensors(cfg)
            check_fits_data(cfg, len(train.y))
            log.info("data %s: %d train / %d test from %s (%.1fs)", cfg.data.name,
                     len(train.y), len(test.y), source, time.perf_counter() - t0)
            # Only what this rank's stages read; the rest goes now, before the stages are built.
            here = self.layout.stages_at(self.layout.position(self.rank))
            self.data = RankData(cfg, train, test, inputs=0 in here,
                                 labels=self.layout.num_stages - 1 in here or cfg.rule == "drtp",
                                 device=self.device)
            self.train, self.test = self.data.train, self.data.test
            del train, test
        except StartupError as exc:
            failure = exc
        # Before any other collective: a check that failed on one rank (a node without the
        # data, a damaged shard that rank 0 verified) stops every rank here, together.
        agree_to_start(failure)
        self.engine = build_engine(cfg, model, self.layout, self.device,
                                   resumed.bounds if resumed else None)
        self.checkpoints = Checkpointer(cfg, self.engine, self.layout, self.rank,
                                        self.world_size, self.out_path,
                                        before_commit=lambda: self._inject_fault("save"))
        if resumed is not None:
            load_checkpoint(resumed.folder, self.engine.stages, self.rank)
            self.checkpoints.resumed(resumed)
            # Each rank goes on summing the statistics of its own blocks ("name/<block>").
            mine = {str(i) for s in self.engine.stages for i in range(s.first, s.last)}
            self.state.progress.stats = {k: v for k, v in self.state.progress.stats.items()
                                         if k.split("/")[-1] in mine}
            log.info("resumed from %s: epoch %d, step %d", resume, self.state.epoch,
                     self.state.step)
        # Outputs only once the data and every stage are in place: a run that cannot start
        # leaves --out as it found it.
        if overwrite and self.out_dir is not None:
            clear_run(self.out_dir)
        self.writer = RunWriter(self.out_dir, keep_rows=self.state.metrics_rows
                                if resumed is not None else None)
        if resumed is None:
            self.writer.config(to_dict(cfg))
        else:
            # config.yaml keeps what the run started with; a change is history.
            changed = config_changes(resumed.manifest["config"], to_dict(cfg))
            if changed:
                self.writer.resumed({"step": self.state.step, "epoch": self.state.epoch,
                                     "changed": changed})
        # TensorBoard scalars from rank 0 (<out>/tensorboard); a resumed run drops the events
        # written after its checkpoint (those at the checkpoint's own step were logged before
        # it was saved, and stay).
        self.tb = TensorBoardWriter(self.out_dir / "tensorboard" if self.out_dir else None,
                                    purge_step=self.state.step + 1 if resumed else None)
        self.tb.config(to_dict(cfg))
        if self.out_dir is not None:
            clear_final_state(self.out_dir)
        self.model = self.engine.model  # meta except for this rank's blocks
        self.stages = self.engine.stages
        self.dp = self.layout.dp
        self.replica = self.engine.replica
        # Outputs per sample: tokens for a language model, whose loss and accuracy are per token.
        self.positions = model.signal_spec.positions
        self.language_model = cfg.data.name in TEXT_DATASETS
        self.inputs, self.probe = self.data.inputs, self.data.probe
        self.stop_requested = False  # set by request_stop (signal handlers)
        self._t0 = time.perf_counter()

    # -- evaluation ------------------------------------------------------------------------

    def evaluate(self, data: Tensors) -> tuple[float, float]:
        """(mean loss, accuracy) per output: per sample, or per token for a language model."""
        loss, correct = self.engine.evaluate(data.x, data.y, self.cfg.data.eval_batch_size,
                                             self.inputs)
        outputs = len(data.y) * self.positions
        return loss / outputs, correct / outputs

    def _perplexity(self, loss: float) -> dict[str, float]:
        """Language models: {"perplexity": exp(mean token loss)}; nothing for classifiers."""
        return {"perplexity": math.exp(min(loss, 700.0))} if self.language_model else {}

    def _replica_rows(self, idx: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        """This replica's share of a global mini-batch: (indices, row offset, global size).
        A global batch with fewer rows than replicas leaves some replicas none."""
        parts = split_micro_batches(len(idx), self.dp)
        start, size = parts[self.replica] if self.replica < len(parts) else (len(idx), 0)
        return idx[start:start + size], start, len(idx)

    # -- training --------------------------------------------------------------------------

    def calibration_due(self, epoch: int) -> tuple[bool, float | None]:
        """(calibrate now?, the mean block alignment that decided it, if measured)."""
        c = self.cfg.calibration
        if c.every_epochs <= 0 or epoch % c.every_epochs:
            return False, None
        if c.budget and len(self.state.calibrations) >= c.budget:
            return False, None
        if c.trigger == "every":
            return True, None
        # Collective: every stage measures its blocks; rank 0 decides for everyone.
        align = probe_alignment(self.engine, self.probe.x, self.probe.y, self.cfg.seed,
                                      max_outputs=0)
        cos = [v["grad_cos"] for v in align.values()]
        mean = sum(cos) / len(cos) if cos else 1.0
        decision = (mean < c.threshold, mean) if self.rank == 0 else None
        return self.engine.transport.all_gather_object(decision)[0]

    def calibrate(self, epoch: int) -> None:
        """One exact BP step on one random mini-batch (Algorithm 1, step 4)."""
        bs = min(self.cfg.calibration.batch_size * self.dp, len(self.train.y))
        idx = random_batch_indices(len(self.train.y), bs, self.cfg.seed, epoch)
        rows, offset, total = self._replica_rows(idx)
        c = self.cfg.calibration
        check = self._check_rows(idx, epoch) if c.line_search and c.check_rows else None
        result = self.engine.calibrate(*self.data.training_rows(rows, epoch), self.state.step,
                                       offset, total, c.line_search, check)
        self.state.calibrations.append(CalibrationEvent(epoch, self.state.step, len(idx),
                                                        **result.to_json()))

    def _check_rows(self, batch: torch.Tensor, epoch: int) -> CheckRows:
        """This replica's share of the rows a calibration is judged on (RankData)."""
        idx = self.data.check_indices(batch, epoch, self.cfg.calibration.check_rows)
        rows, _, total = self._replica_rows(idx)
        return CheckRows(*self.data.plain_rows(rows), total, self.cfg.data.eval_batch_size)

    def train_epoch(self, epoch: int) -> tuple[float, float, dict[str, float]]:
        """Train one epoch, or its rest when resumed mid-epoch (`state.progress`)."""
        cfg = self.cfg
        batches = epoch_batches(len(self.train.y), cfg.data.batch_size * self.dp, cfg.seed, epoch,
                                drop_last=cfg.data.drop_last)
        prog = self.state.progress
        bar = Progress(len(batches) - prog.batches, f"epoch {epoch}/{cfg.train.epochs}",
                       cfg.train.progress and self.rank == 0,
                       rest_of_run=(cfg.train.epochs - epoch) * len(batches))
        for idx in batches[prog.batches:]:
            rows, offset, total = self._replica_rows(idx)
            if self.state.step < cfg.optim.warmup_steps:
                lr = scheduled_lr(cfg.optim, epoch, cfg.train.epochs)
                for opt in self.engine.optimizers:
                    set_lr(opt, lr * warmup_factor(cfg.optim, self.state.step))
            t_step = time.perf_counter()
            r = self.engine.train_step(*self.data.training_rows(rows, epoch), self.state.step,
                                       offset, total)
            self.state.step += 1
            self.tb.step(self.state.step, loss=r.loss_sum / max(r.samples * self.positions, 1),
                         step_time_ms=1000 * (time.perf_counter() - t_step))
            self._inject_fault("step")
            prog.batches += 1
            prog.loss += r.loss_sum
            prog.correct += r.correct
            prog.seen += r.samples * self.positions
            for k, v in r.stats.items():
                prog.stats[k] = prog.stats.get(k, 0.0) + v
            bar.update(loss=prog.loss / prog.seen, acc=prog.correct / prog.seen)
            every = cfg.train.checkpoint_every_steps
            if every and self.state.step % every == 0 and prog.batches < len(batches):
                self.save_checkpoint()
            self._check_stop(r.loss_sum)
        bar.close()
        return (prog.loss / prog.seen, prog.correct / prog.seen,
                {k: v / len(batches) for k, v in prog.stats.items()})

    # -- checkpoints and interruption --------------------------------------------------------

    def request_stop(self) -> None:
        """Ask the run to stop after the current step with a checkpoint (signal handlers)."""
        self.stop_requested = True

    def _check_stop(self, loss: float = 0.0) -> None:
        """Collective, after every step: all ranks stop on the same step if any was asked to
        (a signal), or if any holds a non-finite loss, weight or feedback matrix."""
        bad = nonfinite_blocks(self.stages, loss)
        flag = torch.tensor([1.0 if self.stop_requested else 0.0, float(len(bad))],
                            device=self.device if self.device.type == "cuda" else "cpu")
        if self.world_size > 1:
            self.engine.transport.all_reduce(flag)
        if flag[1].item() > 0:
            blocks = sorted({b for part in self.engine.transport.all_gather_object(bad)
                             for b in part})
            raise NonFiniteError(self.state.epoch, self.state.step, blocks,
                                 self.last_checkpoint)
        if flag[0].item() > 0:
            saved = self.checkpoints.saved
            path = saved[1] if saved and saved[0] == self.state.step else self.save_checkpoint()
            raise TrainingInterrupted(self.state.epoch, self.state.step, path)

    def _inject_fault(self, at: str) -> None:
        """GRAPE_FAULT: crash or hang here if it names this step, rank and point."""
        if self.fault is not None and self.fault.due(self.state.step, self.rank, at):
            self.fault.fire()

    @property
    def last_checkpoint(self) -> Path | None:
        """The newest checkpoint written (or resumed from) by this process, if any."""
        return self.checkpoints.last

    def save_checkpoint(self) -> Path | None:
        """Collective: every stage's state and the trainer's (Checkpointer.save)."""
        return self.checkpoints.save(self.state, self.state.elapsed_s + time.perf_counter()
                                     - self._t0)

    def fit(self) -> dict:
        cfg = self.cfg
        # The feedback points' names, by global index (the keys of GrAPE's align_cos stats).
        names = {pt.index: pt.name for pt in
                 self.model.feedback_points(layer=cfg.feedback.points == "layer")}
        state = self.state
        # A resumed run continues the epoch its checkpoint was taken in, or the next one.
        first = state.epoch + 1 if state.epoch_done else state.epoch
        for epoch in range(max(first, 1), cfg.train.epochs + 1):
            if state.epoch != epoch:
                state.epoch, state.progress, state.epoch_done = epoch, EpochProgress(), False
            t_epoch = time.perf_counter()
            lr = scheduled_lr(cfg.optim, epoch, cfg.train.epochs)
            for opt in self.engine.optimizers:
                set_lr(opt, lr)
            t_train = time.perf_counter()
            train_loss, train_acc, stats = self.train_epoch(epoch)
            state.train_s += time.perf_counter() - t_train
            calibrated, trigger_cos = self.calibration_due(epoch)
            if calibrated:
                t_train = time.perf_counter()
                self.calibrate(epoch)
                state.train_s += time.perf_counter() - t_train
                self.tb.calibration(state.step, len(state.calibrations))
            if epoch % cfg.train.eval_every and epoch != cfg.train.epochs:
                state.epoch_done = True
                self.save_checkpoint()
                continue
            test_loss, test_acc = self.evaluate(self.test)
            state.last_test_loss, state.last_test_accuracy = test_loss, test_acc
            state.best_test_accuracy = max(state.best_test_accuracy, test_acc)
            state.best_test_loss = min(state.best_test_loss, test_loss)
            align = probe_alignment(self.engine, self.probe.x, self.probe.y, cfg.seed,
                                          cfg.train.jacobian_metric_max_outputs)
            stats = self.engine.merge_stats(stats)
            for k, v in stats.items():
                name = names[int(k.split("/")[1])]
                if k.startswith("align_cos/") and name in align:
                    align[name]["train_col_cos"] = v
            base = {"epoch": epoch, "step": self.state.step}
            trigger = {} if trigger_cos is None else {"trigger_grad_cos": trigger_cos}
            checked = calibrated and state.calibrations[-1].loss_before is not None
            if checked:
                c = state.calibrations[-1]
                trigger["calibration"] = {"loss_before": c.loss_before,
                                          "loss_after": c.loss_after, "scale": c.scale}
            for row in ({**base, "split": "train", "loss": train_loss, "accuracy": train_acc,
                         **self._perplexity(train_loss)},
                        {**base, "split": "test", "loss": test_loss, "accuracy": test_acc,
                         **self._perplexity(test_loss), "calibrated": calibrated, **trigger,
                         "alignment": align}):
                self.writer.metrics(row)
                self.tb.evaluation(row)
            # Clocks apart from metrics.jsonl, which stays the same on any layout or resume.
            self.writer.timing({**base, "train_seconds": round(state.train_s, 3),
                                "wall_seconds": round(state.elapsed_s + time.perf_counter()
                                                      - self._t0, 3)})
            cos = " ".join(f"{n}:{v['grad_cos']:.2f}" for n, v in align.items())
            log.info("epoch %d/%d step %d | train loss %.4f acc %.4f | test loss %.4f acc %.4f%s"
                     "%s | %.1fs", epoch, cfg.train.epochs, self.state.step, train_loss,
                     train_acc, test_loss, test_acc, f" | cos(B^T e, grad) {cos}" if cos else "",
                     _calibrated_note(state.calibrations[-1] if calibrated else None),
                     time.perf_counter() - t_epoch)
            state.metrics_rows += 2
            state.epoch_done = True
            self.save_checkpoint()
        test_loss, test_acc = state.last_test_loss, state.last_test_accuracy
        summary = {
            "rule": cfg.rule,
            "model": cfg.model.name,
            "dataset": cfg.data.name,
            "final_test_accuracy": test_acc,
            "final_test_loss": test_loss,
            "best_test_accuracy": self.state.best_test_accuracy,
            **{f"final_test_{k}": v for k, v in self._perplexity(test_loss).items()},
            **{f"best_test_{k}": v for k, v in self._perplexity(self.state.best_test_loss).items()},
            "epochs": cfg.train.epochs,
            "steps": self.state.step,
            "calibration_steps": len(self.state.calibrations),
            "world_size": self.world_size,
            "pp": self.layout.pp,
            "dp": self.dp,
            "stages": self.layout.num_stages,
            "wall_seconds": round(state.elapsed_s + time.perf_counter() - self._t0, 3),
            **self.engine.memory_report(),
            # What this rank holds of the dataset (data/held.py): inputs on stage 0, labels on
            # the last stage.
            "dataset_bytes_per_rank": self.engine.transport.all_gather_object(
                self.data.nbytes),
        }
        self.writer.summary(summary)
        self.tb.close()
        if cfg.train.save_final and self.out_path is not None:
            self.engine.save_final(self.out_path, self.state.step, self.state.epoch)
        return summary
