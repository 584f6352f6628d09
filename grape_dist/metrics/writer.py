"""Run outputs: resolved config, one JSON line per evaluation, and a summary, written so that a
crash never leaves a half-written file behind."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import yaml

from ..fileio import atomic_write_text

# What marks a folder as holding a run, and what --overwrite removes.
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "launch.json", "timing.jsonl",
             "resumes.jsonl")
RUN_FOLDERS = ("checkpoints", "final_state", "tensorboard", "trace")


def held_run_files(out: str | Path) -> list[str]:
    """The names in `out` that belong to a run (empty: no run there)."""
    return [name for name in (*RUN_FILES, *RUN_FOLDERS) if (Path(out) / name).exists()]


def clear_run(out: str | Path) -> None:
    """Remove the run in `out` (--overwrite); other files there are left alone."""
    for name in held_run_files(out):
        path = Path(out) / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()


class RunWriter:
    """Writes `config.yaml`, `metrics.jsonl`, `timing.jsonl` (per evaluation: training seconds
    and wall seconds so far) and `summary.json` under `out_dir` (None: no-op)."""

    def __init__(self, out_dir: str | Path | None, keep_rows: int | None = None) -> None:
        """`keep_rows`: a resumed run keeps that many rows of metrics.jsonl (those written up
        to its checkpoint; the trainer checked they are there) and appends; None starts a fresh
        file."""
        self.out_dir = Path(out_dir) if out_dir is not None else None
        if self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            # Two metrics rows (train, test) per evaluation, one timing row.
            for name, keep in (("metrics.jsonl", keep_rows or 0),
                               ("timing.jsonl", (keep_rows or 0) // 2)):
                path = self.out_dir / name
                rows = path.read_text().splitlines(keepends=True) if keep and path.exists() \
                    else []
                atomic_write_text(path, "".join(rows[:keep]))

    def config(self, data: dict) -> None:
        if self.out_dir is not None:
            atomic_write_text(self.out_dir / "config.yaml", yaml.safe_dump(data, sort_keys=False))

    def resumed(self, entry: dict[str, Any]) -> None:
        """A resume that changed config keys: appended to resumes.jsonl (config.yaml keeps
        the config the run started with; each checkpoint holds the config it was trained
        with, which a resume continues from)."""
        if self.out_dir is not None:
            with open(self.out_dir / "resumes.jsonl", "a") as fh:
                fh.write(json.dumps(entry) + "\n")
                fh.flush()
                os.fsync(fh.fileno())

    def metrics(self, row: dict[str, Any]) -> None:
        if self.out_dir is not None:
            with open(self.out_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")
                fh.flush()

    def timing(self, row: dict[str, Any]) -> None:
        if self.out_dir is not None:
            with open(self.out_dir / "timing.jsonl", "a") as fh:
                fh.write(json.dumps(row) + "\n")

    def summary(self, data: dict[str, Any]) -> None:
        if self.out_dir is not None:
            atomic_write_text(self.out_dir / "summary.json", json.dumps(data, indent=2) + "\n")
