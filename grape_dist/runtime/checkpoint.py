"""Checkpoints: every stage's state through torch.distributed.checkpoint, plus a manifest.

Layout under a run folder:

    checkpoints/step_000001234/   DCP files (each rank writes its own shard: __<rank>_0.distcp)
                                  and .metadata, then manifest.json (step, epoch, data position,
                                  layout, config, trainer state, size and SHA-256 of every file)
    checkpoints/latest            the name of the newest complete checkpoint

Saving is atomic: the ranks write into `step_N.partial/`, rank 0 adds the manifest and renames
the folder, then points `latest` at it (a rename too). A crash at any moment leaves the previous
checkpoint as `latest`. Tensors are keyed by their place in the whole model (`model.blocks.3.
weight`, `feedback.3`, `optim.blocks.3.weight.exp_avg`), never by rank; replicas of a stage
hold identical tensors under the same keys and DCP writes them once.

What is saved per stage: block parameters and buffers (BatchNorm statistics), feedback matrices,
the optimiser states of the weights and of GrAPE's B. Per rank: the torch RNG states. Nothing
else is needed: tangents, dropout masks, data order, augmentation and calibration batches are
drawn from streams keyed by (seed, step, ...) or (seed, epoch), and the calibration optimiser's
state is cleared at every calibration (`calibration.form: paper`) or is the weights' own
(`optimizer`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import StartupError
from ..fileio import atomic_write_text, sha256_file
from .stage import Stage

FOLDER = "checkpoints"
MANIFEST = "manifest.json"
FORMAT = 1


class CheckpointError(StartupError, RuntimeError):
    """A checkpoint is missing, incomplete, corrupted or does not fit this run (raised while
    resuming, before the first step)."""

    prefix = "error: cannot resume"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


@contextlib.contextmanager
def _quiet_dcp() -> Iterator[Any]:
    """torch.distributed.checkpoint, imported on first use (it pulls in DTensor, which a run
    that never saves or resumes does not need). One process without a group is a supported
    case (no_dist), which DCP warns about anyway: silenced."""
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield dcp


def _barrier() -> None:
    if _distributed():
        dist.barrier()


# -- what a stage holds --------------------------------------------------------------------


def _named_parameters(stage: Stage) -> list[tuple[str, torch.Tensor]]:
    return stage.rule.state_parameters()


def _optimizers(stage: Stage) -> list[torch.optim.Optimizer]:
    return stage.rule.state_optimizers()


def stage_tensors(stage: Stage) -> dict[str, torch.Tensor]:
    """The stage's model and feedback tensors under their global keys (views: loading into
    them restores the stage in place)."""
    out = {f"model.blocks.{stage.first + b}.{k}": v for b, block in enumerate(stage.blocks)
           for k, v in block.state_dict(keep_vars=True).items()}
    # Fixed feedback (DFA, DRTP) is saved too: it is cheap and makes a checkpoint complete.
    for i, b in stage.rule.feedback_matrices().items():
        out[f"feedback.{i}"] = b
    return {k: v.data if isinstance(v, nn.Parameter) else v for k, v in out.items()}


def optimizer_tensors(stage: Stage) -> dict[str, torch.Tensor]:
    """Every optimiser state entry of the stage as `optim.<param key>.<entry>` tensors."""
    names = {id(p): name for name, p in _named_parameters(stage)}
    out = {}
    for opt in _optimizers(stage):
        for p, state in opt.state.items():
            for k, v in state.items():
                out[f"optim.{names[id(p)]}.{k}"] = v if isinstance(v, torch.Tensor) \
                    else torch.tensor(v)
    return out


def _restore_optimizers(stage: Stage, loaded: dict[str, torch.Tensor]) -> None:
    params = dict(_named_parameters(stage))
    for opt in _optimizers(stage):
        opt.state.clear()
    owner = {id(p): opt for opt in _optimizers(stage) for g in opt.param_groups
             for p in g["params"]}
    for key, value in loaded.items():
        name, entry = key[len("optim."):].rsplit(".", 1)
        p = params[name]
        opt = owner[id(p)]
        if value.dim() == 0 and (opt.defaults.get("fused") or opt.defaults.get("capturable")):
            value = value.to(p.device)  # their step counters live with the parameters
        opt.state[p][entry] = value


# -- saving --------------------------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    return f"step_{step:09d}"


def save_checkpoint(run_dir: str | Path, stages: list[Stage], rank: int, step: int,
                    manifest: dict[str, Any], keep: int = 2,
                    before_commit: Callable[[], None] | None = None) -> Path:
    """Collective: every rank calls it with its stages. Returns the checkpoint folder.
    `before_commit` runs once the shards are written, before the manifest and the rename
    (where fault injection kills a rank mid-save)."""
    root = Path(run_dir) / FOLDER
    final = root / checkpoint_name(step)
    partial = root / (final.name + ".partial")
    if rank == 0:
        if partial.exists():
            shutil.rmtree(partial)  # an earlier attempt that died while writing
        partial.mkdir(parents=True)
    _barrier()
    state: dict[str, torch.Tensor] = {}
    for stage in stages:
        state.update(stage_tensors(stage))
        state.update(optimizer_tensors(stage))
    state[f"rng.{rank}.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state[f"rng.{rank}.cuda"] = torch.cuda.get_rng_state()
    with _quiet_dcp() as dcp:
        dcp.save(state, checkpoint_id=partial, no_dist=not _distributed())
    if before_commit is not None:
        before_commit()
    _barrier()
    if rank == 0:
        files = {p.name: _describe(p) for p in sorted(partial.iterdir()) if p.is_file()}
        atomic_write_text(partial / MANIFEST, json.dumps(
            {"format": FORMAT, "step": step, **manifest, "files": files}, indent=1) + "\n")
        _fsync_dir(partial)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        atomic_write_text(root / "latest", final.name + "\n")
        _fsync_dir(root)
        _prune(root, keep)
    _barrier()
    return final


def _describe(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".partial"))
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


# -- loading -------------------------------------------------------------------------------


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of a run folder, or None if it has none."""
    root = Path(run_dir) / FOLDER
    pointer = root / "latest"
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / MANIFEST).is_file():
        raise CheckpointError(f"{pointer} names {path.name}, which has no {MANIFEST}")
    return path


def read_manifest(path: str | Path, verify: bool = True) -> dict[str, Any]:
    """The manifest of checkpoint `path`; with `verify`, every file's size and SHA-256 are
    checked against it (a truncated or corrupted file is named)."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path / MANIFEST}: {exc}") from exc
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{path / MANIFEST}: format {manifest.get('format')!r}, "
                              f"this version reads {FORMAT}")
    if verify:
        for name, want in manifest["files"].items():
            file = path / name
            if not file.is_file():
                raise CheckpointError(f"checkpoint file {file} is missing")
            got = _describe(file)
            if got["bytes"] != want["bytes"]:
                raise CheckpointError(f"checkpoint file {file} has {got['bytes']} bytes, the "
                                      f"manifest says {want['bytes']} (truncated?)")
            if got["sha256"] != want["sha256"]:
                raise CheckpointError(f"checkpoint file {file} does not match its SHA-256 in "
                                      "the manifest (corrupted)")
    _add_new_keys(manifest["config"])
    return manifest


# Config keys added after checkpoints of this format were first written, with the value (or
# a function of the saved config giving it) that behaves as the code before them did: an older
# run resumes as it trained.
ADDED_KEYS: dict[str, Any] = {
    "calibration.line_search": 0,
    "calibration.check_rows": 0,
    "optim.warmup_steps": 0,
    "grape.b_optim.warmup_steps": 0,
    "calibration.optim.warmup_steps": 0,
    # Torch's schedules always dropped a partial last mini-batch, the native one never did.
    "data.drop_last": lambda c: c.get("pipeline", {}).get("schedule", "native") != "native",
}


def _add_new_keys(config: dict[str, Any]) -> None:
    for dotted, value in ADDED_KEYS.items():
        *parents, key = dotted.split(".")
        node = config
        for name in parents:
            node = node.setdefault(name, {})
        if key not in node:
            node[key] = value(config) if callable(value) else value


def load_checkpoint(path: str | Path, stages: list[Stage], rank: int) -> None:
    """Collective: restore this rank's stages (and RNG states) from checkpoint `path`."""
    path = Path(path)
    with _quiet_dcp() as dcp:
        stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    state: dict[str, torch.Tensor] = {}
    optim: list[dict[str, torch.Tensor]] = []  # per stage: its optimiser entries, to load into
    for stage in stages:
        state.update(stage_tensors(stage))
        params = dict(_named_parameters(stage))
        mine = {}
        for key, meta in stored.items():
            name = key[len("optim."):].rsplit(".", 1)[0] if key.startswith("optim.") else None
            if name in params:
                device = params[name].device if meta.size else torch.device("cpu")
                mine[key] = torch.empty(meta.size, dtype=meta.properties.dtype, device=device)
        optim.append(mine)
    missing = [k for k in state if k not in stored]
    if missing:
        raise CheckpointError(f"{path} has no {missing[0]} (and {len(missing) - 1} more "
                              "tensors this run needs): another model or rule?")
    for k, v in state.items():
        if tuple(stored[k].size) != tuple(v.shape):
            raise CheckpointError(f"{path}: {k} is {tuple(stored[k].size)} there, "
                                  f"{tuple(v.shape)} in this run")
    rng = {k: torch.empty(stored[k].size, dtype=torch.uint8)
           for k in (f"rng.{rank}.cpu", f"rng.{rank}.cuda") if k in stored}
    with _quiet_dcp() as dcp:
        dcp.load({**state, **{k: v for m in optim for k, v in m.items()}, **rng},
                 checkpoint_id=path, no_dist=not _distributed())
    for stage, mine in zip(stages, optim, strict=True):
        _restore_optimizers(stage, mine)
    if f"rng.{rank}.cpu" in rng:
        torch.set_rng_state(rng[f"rng.{rank}.cpu"])
    if f"rng.{rank}.cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng[f"rng.{rank}.cuda"])
    _barrier()


# Keys a resumed run may change: they do not alter the trajectory up to the checkpoint (the
# learning rates change it from there on: how a diverged run is continued).
RESUME_MAY_CHANGE = ("train.epochs", "train.progress", "train.threads", "train.device",
                     "train.checkpoint", "train.checkpoint_every_steps", "train.keep_checkpoints",
                     "data.root", "pipeline.timeout_s", "optim.lr", "grape.b_optim.lr",
                     # Another layout: any split and micro-batching follow one trajectory; the
                     # global batches (dp x the per-replica sizes) are checked apart.
                     "pipeline.pp", "pipeline.dp", "pipeline.stage_blocks", "pipeline.balance",
                     "pipeline.micro_batches", "pipeline.max_sends_in_flight",
                     "data.batch_size", "calibration.batch_size")


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, list[Any]]:
    """{dotted key: [saved value, value now]} for every key whose value differs, sorted."""
    a, b = _flatten(saved), _flatten(now)
    return {k: [a.get(k), b.get(k)] for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}


def check_resumable(manifest: dict[str, Any], cfg: Any, layout: Any) -> None:
    """Refuse to resume a checkpoint into another config (apart from RESUME_MAY_CHANGE) or
    global batch; the message names what differs. Another world size, pp and dp are fine: the
    state is keyed by global block index and every rank loads its own blocks' part (a
    trajectory does not depend on the layout), provided each global mini-batch, dp x the
    per-replica size, stays the same."""
    from ..config import to_dict

    saved = manifest["config"]
    for section, key in (("data", "batch_size"), ("calibration", "batch_size")):
        before = manifest["dp"] * saved[section][key]
        now = layout.dp * getattr(getattr(cfg, section), key)
        if before != now:
            hint = (f"set {section}.{key}={before // layout.dp}" if before % layout.dp == 0
                    else f"choose a pipeline.dp dividing {before}")
            raise CheckpointError(
                f"the checkpoint's global {section}.{key} is dp={manifest['dp']} x "
                f"{saved[section][key]} = {before}, this run's pipeline.dp={layout.dp} x "
                f"{getattr(getattr(cfg, section), key)} = {now}: {hint}")
    diff = config_changes(manifest["config"], to_dict(cfg))
    changed = [k for k in diff if k not in RESUME_MAY_CHANGE]
    if changed:
        k = changed[0]
        raise CheckpointError(
            f"{k} is {diff[k][1]!r} here but {diff[k][0]!r} in the checkpoint"
            + (f" (and {len(changed) - 1} more keys differ)" if len(changed) > 1 else "")
            + f"; a resumed run may change only {', '.join(RESUME_MAY_CHANGE)}")
