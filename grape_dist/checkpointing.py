"""A run's checkpoints from the trainer's side: what a resume starts from, and saving every
stage's state with the trainer's. The format, atomic writes and the resume checks are
runtime/checkpoint.py's."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .config import Config, to_dict
from .runtime import Layout, PipelineEngine
from .runtime.checkpoint import CheckpointError, check_resumable, read_manifest, save_checkpoint
from .train_state import TrainState

log = logging.getLogger("grape_dist")


def check_metrics_rows(out: Path, rows: int) -> None:
    """A resumed run keeps the first `rows` lines of metrics.jsonl: they must be there."""
    path = out / "metrics.jsonl"
    have = len(path.read_text().splitlines()) if path.exists() else 0
    if have < rows:
        raise CheckpointError(f"{path} has {have} rows but the checkpoint was taken after "
                              f"{rows}: the run folder was edited or is not this checkpoint's")


@dataclass
class Resume:
    """Where a resumed run starts: its checkpoint's manifest, the trainer's state, and the stage
    split to keep (None: this layout is split afresh; the state is keyed by global block index,
    runtime/checkpoint.py)."""

    folder: Path
    manifest: dict
    state: TrainState
    bounds: list[tuple[int, int]] | None


def read_resume(folder: str | Path, cfg: Config, layout: Layout, rank: int,
                out_dir: Path | None) -> Resume:
    """Check that the checkpoint `folder` can continue as this config on this layout (rank 0
    verifies its files; the rank that writes checks metrics.jsonl) and read its state."""
    manifest = read_manifest(folder, verify=rank == 0)
    check_resumable(manifest, cfg, layout)
    if out_dir is not None:
        check_metrics_rows(out_dir, manifest["trainer"]["metrics_rows"])
    same = (manifest["pp"], manifest["dp"], len(manifest["stage_bounds"])) == \
        (layout.pp, layout.dp, layout.num_stages)
    bounds = [tuple(b) for b in manifest["stage_bounds"]] if same else None
    return Resume(Path(folder), manifest, TrainState.from_json(manifest["trainer"]), bounds)


class Checkpointer:
    """Saves the run's checkpoints (collective) and remembers the newest one."""

    def __init__(self, cfg: Config, engine: PipelineEngine, layout: Layout, rank: int,
                 world_size: int, out_path: Path | None,
                 before_commit: Callable[[], None] | None = None) -> None:
        self.cfg = cfg
        self.engine = engine
        self.layout = layout
        self.rank = rank
        self.world_size = world_size
        self.out_path = out_path
        self.before_commit = before_commit  # fault injection (faults.py) before the commit
        self.saved: tuple[int, Path | None] | None = None  # (step, folder) of the last save
        # Called on every rank after each checkpoint (the Ray job reports them to Ray Train).
        self.hook: Callable[[Path], None] | None = None

    @property
    def last(self) -> Path | None:
        """The newest checkpoint written (or resumed from) by this process, if any."""
        return self.saved[1] if self.saved else None

    def resumed(self, resume: Resume) -> None:
        self.saved = (resume.state.step, resume.folder)

    def save(self, state: TrainState, elapsed_s: float) -> Path | None:
        """Collective: every stage's state and `state`, atomically (no-op without an output
        folder or with `train.checkpoint=false`). `elapsed_s`: the run's training time so
        far."""
        if self.out_path is None or not self.cfg.train.checkpoint:
            return None
        stages = self.engine.stages
        bounds = sorted(b for part in self.engine.transport.all_gather_object(
            [(s.index, s.first, s.last) for s in stages]) for b in part)
        trainer = state.to_json()
        trainer["elapsed_s"] = elapsed_s
        # Per-block statistics live on the ranks holding the blocks: keep every rank's.
        trainer["progress"]["stats"] = self.engine.merge_stats(state.progress.stats)
        manifest = {"epoch": state.epoch, "epoch_done": state.epoch_done,
                    "world_size": self.world_size, "pp": self.layout.pp, "dp": self.layout.dp,
                    "stage_bounds": [[first, last] for _, first, last in bounds],
                    "config": to_dict(self.cfg), "trainer": trainer}
        path = save_checkpoint(self.out_path, stages, self.rank, state.step, manifest,
                               keep=self.cfg.train.keep_checkpoints,
                               before_commit=self.before_commit)
        self.saved = (state.step, path)
        if self.hook is not None:
            self.hook(path)
        log.debug("checkpoint %s", path)
        return path
