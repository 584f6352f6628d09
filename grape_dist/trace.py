"""Per-rank timelines: what each rank did when, as Chrome / Perfetto trace files.

    from grape_dist import trace

    trace.enable("runs/x/trace", rank, skip=5, steps=20, device=device)  # once per process
    with trace.step(i):                            # the engine wraps every mini-batch in one
        with trace.span("forward", stage=s, mb=j):  # lane "compute" unless told otherwise
            ...
        with trace.span("recv", lane="comm", src=s - 1, dst=s):
            ...
    trace.save()                                   # also done by itself when the window ends

The API (stable: the runtime, the trainer, the benchmark and the rules use it):

- `enable(out_dir, rank, *, skip=0, steps=None, device=None)`: set up this process's tracer.
  Nothing is recorded until `skip` calls of `step` have passed; then `steps` steps are recorded
  (None: every step until `save`), and the file is written at the start of the step after them.
  `device`: a CUDA device makes every recorded span synchronise it at both ends, so a span's
  duration is the work issued inside it, not the time to launch it (this serialises CUDA
  streams while recording; nothing is synchronised when tracing is off or on the CPU).
- `step(index=None, name="step", **args)`: context manager, the per-step span on lane "step";
  it also moves the recording window (see `enable`). `name="calibration"` for a BP calibration
  step.
- `span(name, lane="compute", **args)`: context manager for one span; `args` (numbers or
  strings) are shown with it. When tracing is off or outside the window it returns a shared
  no-op object: the cost is one function call and one global read.
- `instant(name, lane="compute", **args)`: a zero-length mark.
- `recording()`: whether spans are recorded now (to skip computing expensive `args`).
- `enabled()`: whether `enable` was called (and `disable` was not).
- `save()`: write `<out_dir>/trace_rank{R}.json` (atomically) and stop recording; returns the
  path, or None when tracing is off. Idempotent.
- `disable()`: drop the tracer without writing.

The file: `{"traceEvents": [...], "displayTimeUnit": "ms", "otherData": {...}}` with "ph": "X"
complete events (`ts`, `dur` in microseconds; `ts` counts from the Unix epoch, so the files of
ranks on one host line up), `pid` = the rank, `tid` = the lane's number, named by "M"
(metadata) events: `process_name` "rank R", `thread_name` the lane ("step", "compute", "comm",
then others in order of first use). Spans of one lane nest (a child lies within its parent), as
Chrome's format requires. Open it in https://ui.perfetto.dev or chrome://tracing, or draw every
rank as one PNG: `python -m grape_dist.report timeline DIR --out timeline.png`.

Span names the runtime records (args in parentheses):

- lane "step": `step` (step), `calibration` (step): one mini-batch, from the engine.
- lane "compute": `forward` (stage, mb): a stage's forward of a micro-batch (with GrAPE's
  tangents); `loss` (mb): the last stage's loss and output signal; `backward` (stage, mb): the
  rule's per-micro-batch backward (BP's backward; a direct rule taking its signal, which is its
  local update when streaming); `modulated forward` (stage, mb): PEPITA; `update` (stage): the
  rule's `finish_step` (GrAPE's B step, the local updates, the optimiser step); `optimiser`
  (optimizer): every `torch.optim.Optimizer.step` (the weights' and the B optimiser's), from
  torch's global optimiser hooks; torch's pipelining schedules: `forward`, `backward`,
  `backward weight` (stage, mb). Inside the direct rules: `tangents`, `B step`, `local update`.
- lane "comm": `recv` (src, dst): waiting for a stage's input or input gradient; `send` (src,
  dst): handing it over (asynchronous); `broadcast` (root): packing and issuing the signal
  broadcast; `broadcast wait`: waiting for it (and unpacking); `all_reduce`: the sum over
  data-parallel replicas of the step's statistics; `flush`: waiting for this rank's sends at
  the end of the step; `p2p wait`: torch's pipelining schedules waiting for their transfers.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch.optim.optimizer import (
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)

from .fileio import atomic_write_text

log = logging.getLogger("grape_dist")

LANES = ("step", "compute", "comm")


class _NoSpan:
    """The span handed out when nothing is recorded: enters and exits doing nothing."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False


_NO_SPAN = _NoSpan()


class _Span:
    __slots__ = ("tracer", "name", "lane", "args", "t0")

    def __init__(self, tracer: _Tracer, name: str, lane: str, args: dict[str, Any]) -> None:
        self.tracer, self.name, self.lane, self.args = tracer, name, lane, args

    def __enter__(self) -> _Span:
        self.tracer.sync()
        self.t0 = time.perf_counter_ns()
        return self

    def __exit__(self, *exc: object) -> bool:
        self.tracer.sync()
        self.tracer.add(self.name, self.lane, self.t0, time.perf_counter_ns() - self.t0,
                        self.args)
        return False


class _Tracer:
    def __init__(self, out_dir: str | Path, rank: int, skip: int, steps: int | None,
                 device: torch.device | None) -> None:
        self.path = Path(out_dir) / f"trace_rank{rank}.json"
        self.rank = rank
        self.skip, self.steps = skip, steps
        self.cuda = device if device is not None and device.type == "cuda" else None
        self.seen = 0  # step() calls so far
        self.recorded = 0  # steps recorded
        self.closed = False
        # (name, lane, start ns on the monotonic clock, duration ns, args)
        self.events: list[tuple[str, str, int, int, dict[str, Any]]] = []
        self.lanes: dict[str, int] = {name: i for i, name in enumerate(LANES)}
        # The monotonic clock's zero on the wall clock, so that ranks' files line up.
        self.wall0_ns = time.time_ns()
        self.perf0_ns = time.perf_counter_ns()
        self.opened: dict[int, list[_Span]] = {}  # optimiser spans, by optimiser
        self.hooks = [
            register_optimizer_step_pre_hook(self._optimizer_pre),
            register_optimizer_step_post_hook(self._optimizer_post),
        ]

    def sync(self) -> None:
        if self.cuda is not None:
            torch.cuda.synchronize(self.cuda)

    def add(self, name: str, lane: str, t0: int, dur: int, args: dict[str, Any]) -> None:
        self.events.append((name, lane, t0, dur, args))

    def _optimizer_pre(self, opt: torch.optim.Optimizer, *_: Any) -> None:
        if _recording is self:
            s = _Span(self, "optimiser", "compute", {"optimizer": type(opt).__name__})
            self.opened.setdefault(id(opt), []).append(s)
            s.__enter__()

    def _optimizer_post(self, opt: torch.optim.Optimizer, *_: Any) -> None:
        stack = self.opened.get(id(opt))
        if stack:
            stack.pop().__exit__(None, None, None)

    def begin_step(self) -> None:
        """Move the window: open it after `skip` steps, close it (and save) after `steps`."""
        global _recording
        if self.closed:
            return
        if self.steps is not None and self.recorded >= self.steps:
            self.save()
            return
        if self.seen >= self.skip:
            _recording = self
            self.recorded += 1
        self.seen += 1

    def remove_hooks(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []

    def document(self) -> dict[str, Any]:
        pid = self.rank
        meta: list[dict[str, Any]] = [
            {"name": "process_name", "ph": "M", "pid": pid, "tid": 0,
             "args": {"name": f"rank {self.rank}"}},
            {"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0,
             "args": {"sort_index": self.rank}}]
        for lane, tid in self.lanes.items():
            meta.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid,
                         "args": {"name": lane}})
            meta.append({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": tid,
                         "args": {"sort_index": tid}})
        base = self.wall0_ns - self.perf0_ns
        events = []
        # Parents before their children when they start together (longest first).
        for name, lane, t0, dur, args in sorted(self.events, key=lambda e: (e[2], -e[3])):
            tid = self.lanes.setdefault(lane, len(self.lanes))
            ev: dict[str, Any] = {"name": name, "cat": lane, "ph": "X" if dur >= 0 else "i",
                                  "ts": (base + t0) / 1e3, "pid": pid, "tid": tid}
            if dur >= 0:
                ev["dur"] = dur / 1e3
            else:
                ev["s"] = "t"
            if args:
                ev["args"] = args
            events.append(ev)
        # Lanes first used by an event get their names too.
        for lane, tid in self.lanes.items():
            if not any(m["tid"] == tid and m["name"] == "thread_name" for m in meta):
                meta.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": tid,
                             "args": {"name": lane}})
        return {"traceEvents": meta + events, "displayTimeUnit": "ms",
                "otherData": {"rank": self.rank, "skip": self.skip, "steps": self.recorded,
                              "clock": "microseconds since the Unix epoch",
                              "host": os.uname().nodename}}

    def save(self) -> Path:
        global _recording
        if _recording is self:
            _recording = None
        if self.recorded == 0 and not self.closed:
            log.warning("trace: no step was recorded on rank %d (%d steps ran, %d skipped "
                        "first)", self.rank, self.seen, self.skip)
        if not self.closed:
            self.closed = True
            self.remove_hooks()
            atomic_write_text(self.path, json.dumps(self.document(), separators=(",", ":")))
        return self.path


_tracer: _Tracer | None = None  # set up by enable()
_recording: _Tracer | None = None  # the tracer while its window is open, else None


def enable(out_dir: str | Path, rank: int, *, skip: int = 0, steps: int | None = None,
           device: torch.device | None = None) -> None:
    """Trace this process (see the module docstring); replaces an earlier tracer unsaved."""
    if skip < 0 or (steps is not None and steps < 1):
        raise ValueError(f"trace: skip must be >= 0 and steps >= 1, got {skip}, {steps}")
    disable()
    global _tracer
    _tracer = _Tracer(out_dir, rank, skip, steps, device)


def disable() -> None:
    """Stop tracing without writing anything."""
    global _tracer, _recording
    if _tracer is not None:
        _tracer.remove_hooks()
    _tracer = _recording = None


def enabled() -> bool:
    return _tracer is not None


def recording() -> bool:
    return _recording is not None


def span(name: str, lane: str = "compute", **args: Any) -> _Span | _NoSpan:
    """A context manager recording one span (a no-op unless recording)."""
    t = _recording
    if t is None:
        return _NO_SPAN
    return _Span(t, name, lane, args)


def step(index: int | None = None, name: str = "step", **args: Any) -> _Span | _NoSpan:
    """The per-step span; also opens and closes the recording window (see `enable`)."""
    t = _tracer
    if t is None:
        return _NO_SPAN
    t.begin_step()
    if _recording is not t:
        return _NO_SPAN
    if index is not None:
        args["step"] = index
    return _Span(t, name, "step", args)


def instant(name: str, lane: str = "compute", **args: Any) -> None:
    """A zero-length mark at this moment (a no-op unless recording)."""
    t = _recording
    if t is not None:
        t.add(name, lane, time.perf_counter_ns(), -1, args)


def save() -> Path | None:
    """Write this rank's file now (see the module docstring); None when tracing is off."""
    return _tracer.save() if _tracer is not None else None
