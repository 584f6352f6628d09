"""Timing helpers shared by the benchmark scripts (run as `python bench/<script>.py`)."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

from grape_dist.fileio import atomic_write_text

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# The keys every benchmark record has (`--json FILE`: a JSON list of records); a record may add
# more (its settings, per-rank numbers).
RECORD_KEYS = ("bench", "model", "method", "micro_batches", "ms", "peak_mb")


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], object], warmup: int, steps: int, device: torch.device) -> float:
    """Median wall time of `fn` in ms over `steps` calls after `warmup`, synchronised."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def record(bench: str, model: str, method: str, micro_batches: int, ms: float | None,
           peak_mb: float | None, **extra: Any) -> dict[str, Any]:
    """One benchmark result: `ms` per mini-batch and `peak_mb` the peak memory in MB (None:
    not measured, or the point did not run), then `extra` keys."""
    return {"bench": bench, "model": model, "method": method,
            "micro_batches": int(micro_batches), "ms": None if ms is None else round(float(ms), 3),
            "peak_mb": None if peak_mb is None else round(float(peak_mb), 1), **extra}


def write_records(path: str | Path, records: Sequence[dict[str, Any]]) -> None:
    """`records` as one JSON list in `path`, written atomically (rewritten after each point,
    so an interrupted run keeps the points it finished)."""
    for r in records:
        missing = [k for k in RECORD_KEYS if k not in r]
        if missing:
            raise ValueError(f"benchmark record without {missing}: {r}")
    atomic_write_text(path, json.dumps(list(records), indent=1) + "\n")


def shipped_form(config_stem: str, rule: str) -> list[str]:
    """The `feedback.*` and `grape.*` settings of the shipped config `<config_stem>_<rule>.yaml`
    as overrides: what `dfa` and `grape` mean in the benchmarks (nothing if there is none)."""
    path = CONFIGS / f"{config_stem}_{rule}.yaml"
    if not config_stem or not path.is_file():
        return []
    data = yaml.safe_load(path.read_text()) or {}
    out: list[str] = []

    def flatten(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                flatten(f"{prefix}.{k}", v)
        else:
            out.append(f"{prefix}={value}")
    for section in ("feedback", "grape"):
        if section in data:
            flatten(section, data[section])
    return out


def merge_overrides(*groups: Sequence[str]) -> list[str]:
    """Overrides in order, a later value of a key replacing an earlier one in place."""
    merged: dict[str, str] = {}
    for group in groups:
        for o in group:
            key, _, _ = o.partition("=")
            merged.pop(key, None)
            merged[key] = o
    return list(merged.values())
