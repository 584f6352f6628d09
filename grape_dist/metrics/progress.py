"""A dependency-free progress line for long loops: redrawn in place on a terminal, a few plain
lines otherwise (so CI logs and files stay short)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, total: int, desc: str, enabled: bool = True, stream: TextIO | None = None,
                 every_s: float = 0.25) -> None:
        self.total, self.desc, self.enabled = total, desc, enabled
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.every_s = every_s if self.tty else 30.0
        self.start = self._last = time.perf_counter()
        self.n = 0

    def update(self, n: int = 1, **info: float) -> None:
        self.n += n
        now = time.perf_counter()
        if not self.enabled or (now - self._last < self.every_s and self.n < self.total):
            return
        self._last = now
        rate = self.n / max(now - self.start, 1e-9)
        width = 24
        fill = int(width * self.n / max(self.total, 1))
        extra = " ".join(f"{k} {v:.4g}" for k, v in info.items())
        line = (f"{self.desc} [{'#' * fill}{'.' * (width - fill)}] {self.n}/{self.total} "
                f"{rate:.1f} it/s {extra}")
        if self.tty:
            self.stream.write("\r" + line + "\033[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\r\033[K")
            self.stream.flush()
