"""A dependency-free progress line for long loops: redrawn in place on a terminal, a few plain
lines otherwise (so CI logs and files stay short).

Every number is printed at a fixed width (the step count padded to the total's width, the rate,
an ETA as HH:MM:SS, each `info` value in 9 characters), so a line redrawn in place does not
jitter as the values change:

    epoch 1/20 [######..................]  117/469   38.2 it/s ETA 00:00:09 run 00:04:01 loss ...

(the run's ETA counts training steps only, at this epoch's rate: evaluations come on top).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from typing import TextIO

VALUE_WIDTH = 9  # characters per info value: "   0.1234", "-123.4567", " 1.23e-05"


def format_duration(seconds: float | None) -> str:
    """HH:MM:SS, always 8 characters; `--:--:--` while unknown, `>99h` past 99 hours."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "--:--:--"
    s = int(round(seconds))
    if s >= 100 * 3600:
        return "  >99h  "
    return f"{s // 3600:02d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def format_value(v: float) -> str:
    """A float in exactly VALUE_WIDTH characters: fixed point where that keeps 4 decimals,
    scientific notation for very small or large magnitudes."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return f"{str(v)[:VALUE_WIDTH]:>{VALUE_WIDTH}}"
    a = abs(v)
    if not math.isfinite(v) or a == 0 or 1e-3 <= a < 1e3:
        text = f"{v:{VALUE_WIDTH}.4f}"
    else:
        text = f"{v:{VALUE_WIDTH}.2e}"
    # `.2e` of |v| >= 1e100 (or a negative one) overflows by a character: keep the width.
    return text if len(text) <= VALUE_WIDTH else f"{v:{VALUE_WIDTH}.1e}"[:VALUE_WIDTH]


def format_rate(rate: float) -> str:
    """Iterations per second, or seconds per iteration when slower than 1 it/s (so slow
    pipelines do not read `0.0 it/s`); always 11 characters."""
    if rate <= 0 or not math.isfinite(rate):
        return "   -.- it/s"
    if rate >= 1:
        return f"{min(rate, 9999.9):6.1f} it/s"
    return f"{min(1 / rate, 9999.9):6.1f} s/it"


class Progress:
    def __init__(self, total: int, desc: str, enabled: bool = True, stream: TextIO | None = None,
                 every_s: float = 0.25, clock: Callable[[], float] = time.perf_counter,
                 rest_of_run: int | None = None) -> None:
        """`clock`: seconds as a float (tests pass a fake one). `rest_of_run`: the iterations
        still to come after this bar's (a run's later epochs): the line then also gives the
        whole run's ETA at this bar's rate."""
        self.total, self.desc, self.enabled = total, desc, enabled
        self.rest_of_run = rest_of_run
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every_s = every_s if self.tty else 30.0
        self.clock = clock
        self.start = self._last = clock()
        self.n = 0

    def eta(self, now: float, rest: int = 0) -> float | None:
        """Seconds left at the mean rate so far (and `rest` iterations more); None before it
        is known."""
        elapsed = now - self.start
        if self.n <= 0 or elapsed <= 0:
            return None
        return (max(self.total - self.n, 0) + rest) * elapsed / self.n

    def line(self, now: float, **info: float) -> str:
        elapsed = now - self.start
        rate = self.n / elapsed if elapsed > 0 else 0.0
        width = 24
        fill = min(int(width * self.n / max(self.total, 1)), width)
        digits = len(str(self.total))
        extra = " ".join(f"{k} {format_value(v)}" for k, v in info.items())
        return (f"{self.desc} [{'#' * fill}{'.' * (width - fill)}] {self.n:>{digits}}/"
                f"{self.total} {format_rate(rate)} ETA {format_duration(self.eta(now))}"
                + ("" if self.rest_of_run is None else
                   f" run {format_duration(self.eta(now, self.rest_of_run))}")
                + (f" {extra}" if extra else ""))

    def update(self, n: int = 1, **info: float) -> None:
        self.n += n
        if not self.enabled:
            return
        now = self.clock()
        if now - self._last < self.every_s and self.n < self.total:
            return
        self._last = now
        line = self.line(now, **info)
        if self.tty:
            self.stream.write("\r" + line + "\033[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()
