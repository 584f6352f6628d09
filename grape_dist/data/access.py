"""Where data comes from and where its cache goes, shared by the image and the text loaders.

- the data root (`data.root`, else ``$GRAPE_DATA_DIR``) and the cache folder
  (``$GRAPE_CACHE_DIR``, else ``~/.cache/grape_dist``);
- reading local parquet through ``datasets`` with the hub switched off, and a quick check that
  the hub is reachable before ``datasets`` would spend ~20 s retrying;
- a file lock so concurrent ranks on one machine build a cache once, and atomic cache writes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "GRAPE_DATA_DIR"
CACHE_DIR_ENV = "GRAPE_CACHE_DIR"
DEFAULT_CACHE_DIR = "~/.cache/grape_dist"

_HUB_PROBE_TIMEOUT_S = 2.0
_TRUE_VALUES = frozenset({"1", "true", "yes", "on"})

_warned_cache_dirs: set[str] = set()


class DatasetUnavailableError(RuntimeError):
    """No local copy of the dataset was found and the hub cannot be used."""


def resolve_root(root: str | os.PathLike[str] | None) -> tuple[Path | None, str]:
    """(data root, where that came from): the argument, else $GRAPE_DATA_DIR, else None."""
    if root is not None and str(root) != "":
        return Path(root).expanduser(), "root argument"
    env = os.environ.get(DATA_DIR_ENV, "")
    if env:
        return Path(env).expanduser(), DATA_DIR_ENV
    return None, ""


def resolve_cache_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    """The argument, else $GRAPE_CACHE_DIR, else ~/.cache/grape_dist."""
    if cache_dir is not None and str(cache_dir) != "":
        return Path(cache_dir).expanduser()
    return Path(os.environ.get(CACHE_DIR_ENV) or DEFAULT_CACHE_DIR).expanduser()


def find_split_files(folder: Path, train: str, evaluated: str) -> dict[str, list[Path]] | None:
    """The parquet shards ``<split>-*.parquet`` of the two splits a run reads, or None when the
    folder holds no training shards."""
    if not folder.is_dir():
        return None
    files = {split: sorted(folder.glob(f"{split}-*.parquet")) for split in (train, evaluated)}
    if not files[train]:
        return None
    if not files[evaluated]:
        # A half-present copy is more likely a mistake than a reason to go to the hub.
        raise DatasetUnavailableError(
            f"{folder} has {train}-*.parquet files but no {evaluated}-*.parquet files"
        )
    return files


def file_stats(files: dict[str, list[Path]]) -> list[list[Any]]:
    """(split, path, size, mtime) of each file: the cache key of data read from local files."""
    return [
        [split, str(p.resolve()), st.st_size, st.st_mtime_ns]
        for split, paths in files.items()
        for p in paths
        for st in [p.stat()]
    ]


def import_datasets() -> Any:
    # Imported lazily: it costs ~0.5 s, and it must be imported *before* any offline variables
    # are set, since datasets and huggingface_hub freeze them at import time.
    import datasets

    return datasets


@contextlib.contextmanager
def offline(datasets: Any) -> Iterator[None]:
    """Keep datasets off the network while it reads local files (it pings the hub otherwise).

    The environment variables only matter to code that reads them later, so datasets' own
    already-frozen flag is switched too; all of it is restored afterwards so a later hub load
    in the same process still works.
    """
    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    saved_flag = getattr(datasets.config, "HF_HUB_OFFLINE", None)
    for k in saved_env:
        os.environ.setdefault(k, "1")
    if saved_flag is not None:
        datasets.config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        if saved_flag is not None:
            datasets.config.HF_HUB_OFFLINE = saved_flag
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def hub_unreachable_reason(datasets: Any) -> str | None:
    """Why the hub cannot be used right now, or None if it looks reachable.

    Checked up front because datasets otherwise retries for ~20 s before giving up.
    """
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        value = os.environ.get(var, "")
        if value.strip().lower() in _TRUE_VALUES:
            return f"offline mode is on ({var}={value})"
    if getattr(datasets.config, "HF_HUB_OFFLINE", False):
        return "offline mode is on (HF_HUB_OFFLINE was set when datasets was imported)"

    from huggingface_hub import constants

    url = urlsplit(constants.ENDPOINT)
    host, port = url.hostname, url.port or (443 if url.scheme == "https" else 80)
    # Behind a proxy only the proxy has to be reachable.
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if proxy:
        purl = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = purl.hostname, purl.port or 80
    if not host:
        return f"cannot parse the hub endpoint {constants.ENDPOINT!r}"
    error = _tcp_probe(host, port, _HUB_PROBE_TIMEOUT_S)
    if error is not None:
        return f"cannot connect to {host}:{port} ({error})"
    return None


def _tcp_probe(host: str, port: int, timeout: float) -> str | None:
    """Try one TCP connection; returns an error text, or None on success.

    Run in a daemon thread because name resolution ignores socket timeouts and can hang.
    """
    result: list[str | None] = []

    def attempt() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            result.append(None)
        except OSError as exc:
            result.append(str(exc) or type(exc).__name__)

    thread = threading.Thread(target=attempt, daemon=True, name="grape-hub-probe")
    thread.start()
    thread.join(timeout + 0.5)
    return result[0] if result else f"no answer within {timeout:.0f} s"


# --------------------------------------------------------------------------------------------
# Cache files


@contextlib.contextmanager
def cache_lock(cache_path: Path) -> Iterator[None]:
    """Hold ``<cache_path>.lock`` (so concurrent ranks build a cache once); without a usable
    lock (read-only folder, a stuck holder) the body runs unlocked."""
    from filelock import FileLock, Timeout

    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(cache_path) + ".lock", timeout=600)
        lock.acquire()
    except (OSError, Timeout) as exc:
        logger.debug("no lock for %s: %s", cache_path, exc)
        yield
        return
    try:
        yield
    finally:
        lock.release()


def save_cache(path: Path, payload: dict[str, Any], stacklevel: int) -> None:
    """``torch.save`` to a temp file in the same folder, then rename: readers never see a
    half-written file. A failure only warns, once per folder (the data is still returned, just
    not cached); ``stacklevel`` is as for ``warnings.warn`` called in save_cache's caller."""
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
        os.chmod(tmp, 0o644)  # mkstemp makes it owner-only; the cache may be shared
        os.replace(tmp, path)
        tmp = None
    except (OSError, RuntimeError) as exc:
        _warn_cache_once(path.parent, "cannot write", exc, stacklevel + 1)
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _warn_cache_once(cache_dir: Path, what: str, exc: BaseException, stacklevel: int) -> None:
    if str(cache_dir) in _warned_cache_dirs:
        return
    _warned_cache_dirs.add(str(cache_dir))
    warnings.warn(
        f"grape_dist: not caching decoded datasets in {cache_dir} ({what}: {exc}); "
        f"set {CACHE_DIR_ENV} to a writable folder to avoid decoding on every run",
        RuntimeWarning,
        stacklevel=stacklevel + 1,
    )
