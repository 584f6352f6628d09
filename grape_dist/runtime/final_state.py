"""Final weights and feedback matrices, written by the rank that holds each stage.

`train.save_final` writes `<out>/final_state/stage_<s>.pt` for every stage s (replica 0's
copy): parameters and buffers under their full-model names (`blocks.<i>.<...>`) and the stage's
feedback matrices. No rank ever gathers the whole model. `load_final_state` merges the files.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..fileio import atomic_save
from .stage import Stage

FOLDER = "final_state"


def save_stage_state(out_dir: str | Path, stage: Stage, num_stages: int, step: int,
                     epoch: int) -> None:
    # Parameters and buffers (BatchNorm's running statistics are part of the model).
    params = {f"blocks.{stage.first + b}.{k}": v.detach().cpu()
              for b, block in enumerate(stage.blocks) for k, v in block.state_dict().items()}
    state = {"stage": stage.index, "num_stages": num_stages, "step": step, "epoch": epoch,
             "model": params,
             "feedback": {i: b.cpu() for i, b in stage.rule.feedback_matrices().items()}}
    atomic_save(state, Path(out_dir) / FOLDER / f"stage_{stage.index:03d}.pt")


def clear_final_state(out_dir: str | Path) -> None:
    """Remove an earlier run's stage files, so that a later merge never mixes two runs."""
    for f in (Path(out_dir) / FOLDER).glob("stage_*.pt"):
        f.unlink()


def load_final_state(out_dir: str | Path) -> dict:
    """{"model": full-model parameters, "feedback": {block: B}, "step", "epoch"}."""
    files = sorted((Path(out_dir) / FOLDER).glob("stage_*.pt"))
    if not files:
        raise FileNotFoundError(f"no {FOLDER}/stage_*.pt under {out_dir} (train.save_final)")
    parts = [torch.load(f) for f in files]
    expected = parts[0]["num_stages"]
    if sorted(p["stage"] for p in parts) != list(range(expected)) or \
            any(p["num_stages"] != expected for p in parts):
        raise ValueError(f"{out_dir}/{FOLDER} holds stages {[p['stage'] for p in parts]}, "
                         f"not the {expected} stages of one run")
    out: dict = {"model": {}, "feedback": {}, "step": parts[0]["step"],
                 "epoch": parts[0]["epoch"]}
    for p in parts:
        out["model"].update(p["model"])
        out["feedback"].update(p["feedback"])
    return out
