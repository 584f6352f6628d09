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


class UsageError(StartupError):
    """Bad command-line flags or launcher environment."""


class DataError(StartupError):
    """The data does not fit the config (a batch or subset larger than the dataset, a file
    without the expected columns)."""
