"""Fault injection for recovery tests and drills: make a rank die at a chosen step.

    GRAPE_FAULT="exit:step=20"                    every rank exits (code 17) after step 20
    GRAPE_FAULT="exit:step=20:rank=1"             only rank 1
    GRAPE_FAULT="kill:step=20:rank=1:once=/tmp/f" SIGKILL itself, once: the marker file /tmp/f is
                                                  created first, and a restarted run that finds
                                                  it carries on (how restarts are tested)

Unset (the normal case) it costs one dictionary lookup per step. The crash is abrupt on purpose
(no checkpoint, no cleanup, `os._exit` or SIGKILL): what a lost node or an OOM kill looks like to
the other ranks.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

ENV = "GRAPE_FAULT"


@dataclass(frozen=True)
class Fault:
    action: str  # exit | kill
    step: int
    rank: int | None = None
    once: Path | None = None

    def due(self, step: int, rank: int) -> bool:
        if step != self.step or (self.rank is not None and rank != self.rank):
            return False
        if self.once is not None:
            if self.once.exists():
                return False
            self.once.touch()
        return True

    def fire(self) -> None:
        if self.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(17)


def parse_fault(text: str) -> Fault:
    """`action:key=value:...`; a malformed value is an error naming the variable."""
    action, *parts = text.split(":")
    if action not in ("exit", "kill"):
        raise ValueError(f"{ENV}={text!r}: the action must be exit or kill")
    fields: dict[str, str] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep or key not in ("step", "rank", "once"):
            raise ValueError(f"{ENV}={text!r}: expected step=N, rank=R or once=PATH, got {part!r}")
        fields[key] = value
    if "step" not in fields:
        raise ValueError(f"{ENV}={text!r}: step=N is required")
    try:
        return Fault(action, int(fields["step"]),
                     int(fields["rank"]) if "rank" in fields else None,
                     Path(fields["once"]) if "once" in fields else None)
    except ValueError:
        raise ValueError(f"{ENV}={text!r}: step and rank must be integers") from None


def fault_from_env() -> Fault | None:
    text = os.environ.get(ENV)
    return parse_fault(text) if text else None
