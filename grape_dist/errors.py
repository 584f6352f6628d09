"""Errors that stop a run before its first step: bad input, not bugs.

Each message names the problem and the fix in one line; the entry point prints it (from rank 0
only, under torchrun) and exits with code 2, without a traceback and without writing to --out.
Classes elsewhere (ConfigError, LayoutError, DatasetUnavailableError, ...) derive from
StartupError so that one handler covers them all.
"""

from __future__ import annotations


class StartupError(Exception):
    """The run cannot start as asked; `prefix` starts the printed line."""

    prefix = "error"
    agreed = False  # whether every rank already knows (RankFailures): only rank 0 prints


class UsageError(StartupError):
    """Bad command-line flags or launcher environment."""


class DataError(StartupError):
    """The data does not fit the config (a batch or subset larger than the dataset, a file
    without the expected columns)."""


class RankFailures(StartupError):
    """Start-up checks failed on some ranks (gathered by every rank, so all stop together and
    rank 0 alone reports): `failures` maps each message to the ranks that hit it."""

    agreed = True

    def __init__(self, failures: dict[tuple[str, str], list[int]], world_size: int) -> None:
        (self.prefix, first), ranks = next(iter(failures.items()))
        if len(failures) == 1 and (len(ranks) == world_size or ranks == [0]):
            # Every rank found the same problem, or rank 0 did in a check it makes for all
            # (the checkpoint's checksums): no rank to name.
            text = first
        else:
            text = " | ".join(f"rank{'s' * (len(r) > 1)} {', '.join(map(str, r))}: {msg}"
                              for (_, msg), r in failures.items())
        super().__init__(text)
        self.failures = failures
