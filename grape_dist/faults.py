"""Fault injection for recovery tests and drills: make a rank die at a chosen step.

    GRAPE_FAULT="exit:step=20"                    every rank exits (code 17) after step 20
    GRAPE_FAULT="exit:step=20:rank=1"             only rank 1
    GRAPE_FAULT="kill:step=20:rank=1:once=/tmp/f" SIGKILL itself, once: the marker file /tmp/f is
                                                  created first, and a restarted run that finds
                                                  it carries on (how restarts are tested)
    GRAPE_FAULT="kill:step=16:at=save"            die while writing the checkpoint of step 16
                                                  (shards written, not yet committed)
    GRAPE_FAULT="refuse:rank=1"                   rank 1's start-up data check fails (as on a
                                                  node without the data)
    GRAPE_FAULT="hang:step=20:rank=1"             stop responding (sleep) after step 20: a
                                                  stuck node or a deadlocked rank

Unset (the normal case) it costs one dictionary lookup per step. The crash is abrupt on purpose
(no checkpoint, no cleanup: `os._exit`, SIGKILL, or a sleep that never returns): what a lost
node, an OOM kill or a stuck rank looks like to the other ranks.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from .errors import DataError, UsageError

ENV = "GRAPE_FAULT"


@dataclass(frozen=True)
class Fault:
    action: str  # exit | kill | hang | refuse
    step: int
    rank: int | None = None
    once: Path | None = None
    at: str = "step"  # step (after a training step) | save (in a checkpoint save) | start

    def due(self, step: int, rank: int, at: str = "step") -> bool:
        if at != self.at or (self.rank is not None and rank != self.rank):
            return False
        if at != "start" and step != self.step:
            return False
        if self.once is not None:
            if self.once.exists():
                return False
            self.once.touch()
        return True

    def fire(self) -> None:
        if self.action == "refuse":
            raise DataError(f"{ENV}: this rank's data check fails on purpose (a node without "
                            "the data); unset it")
        if self.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.action == "hang":
            # A stuck rank that the launcher can still stop (SIGTERM), not a graceful stop.
            with contextlib.suppress(ValueError):  # only the main thread handles signals
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
            while True:  # until a peer's timeout makes the launcher stop this process
                time.sleep(3600)
        os._exit(17)


def parse_fault(text: str) -> Fault:
    """`action:key=value:...`; a malformed value is refused (UsageError) naming the variable."""
    action, *parts = text.split(":")
    if action not in ("exit", "kill", "hang", "refuse"):
        raise UsageError(f"{ENV}={text!r}: the action must be exit, kill, hang or refuse")
    fields: dict[str, str] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or key not in ("step", "rank", "once", "at"):
            raise UsageError(f"{ENV}={text!r}: expected step=N, rank=R, once=PATH or "
                             f"at=step|save|start, got {part!r}")
        if key == "at" and value not in ("step", "save", "start"):
            raise UsageError(f"{ENV}={text!r}: at= takes step, save or start, got {value!r}")
        fields[key] = value
    if action == "refuse":  # a start-up check: no step
        fields.setdefault("at", "start")
        fields.setdefault("step", "0")
        if fields["at"] != "start":
            raise UsageError(f"{ENV}={text!r}: refuse happens at start only")
    elif fields.get("at") == "start":
        raise UsageError(f"{ENV}={text!r}: at=start goes with the refuse action only")
    if "step" not in fields:
        raise UsageError(f"{ENV}={text!r}: step=N is required")
    try:
        return Fault(action, int(fields["step"]),
                     int(fields["rank"]) if "rank" in fields else None,
                     Path(fields["once"]) if "once" in fields else None,
                     fields.get("at", "step"))
    except ValueError:
        raise UsageError(f"{ENV}={text!r}: step and rank must be integers") from None


def fault_from_env() -> Fault | None:
    text = os.environ.get(ENV)
    return parse_fault(text) if text else None
