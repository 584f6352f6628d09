"""Where data comes from and where its cache goes, shared by the image and the text loaders.

- the data root (`data.root`, else ``$GRAPE_DATA_DIR``) and the cache folder
  (``$GRAPE_CACHE_DIR``, else ``~/.cache/grape_dist``);
- reading local parquet through ``datasets`` with the hub switched off, and a quick check that
  the hub is reachable before ``datasets`` would spend ~20 s retrying;
- a file lock so concurrent ranks on one machine build a cache once, and atomic cache writes;
- cache keys from the source files' content (SHA-256), not their location, so every clone or
  mount of the same files shares one cache entry, and a checksum inside each cache file so a
  corrupt or tampered one is rebuilt rather than trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import sys
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch

from grape_dist.errors import DataError, StartupError
from grape_dist.fileio import atomic_save, atomic_write_text, sha256_file

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "GRAPE_DATA_DIR"
CACHE_DIR_ENV = "GRAPE_CACHE_DIR"
DEFAULT_CACHE_DIR = "~/.cache/grape_dist"

_HUB_PROBE_TIMEOUT_S = 2.0
_TRUE_VALUES = frozenset({"1", "true", "yes", "on"})

_warned_cache_dirs: set[str] = set()


class DatasetUnavailableError(StartupError, RuntimeError):
    """No local copy of the dataset was found and the hub cannot be used."""


class DatasetFormatError(DataError, ValueError):
    """A dataset file lacks the columns its registry entry names (not the hub's export)."""


def silence_progress_bars() -> None:
    """No `datasets` progress bars ("Generating train split"): for --quiet, and for every rank
    but 0, whose bars would repeat rank 0's."""
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"  # read when datasets is imported
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()


def resolve_root(root: str | os.PathLike[str] | None, dataset: str = ""
                 ) -> tuple[Path | None, str]:
    """(data root, where that came from): the argument, else $GRAPE_DATA_DIR, else None. A
    folder that was named but does not exist is refused (DatasetUnavailableError): falling
    back to the embedded copy or the hub would train on data the user did not ask for."""
    if root is not None and str(root) != "":
        path, origin, name = Path(root).expanduser(), "root argument", f"data.root={root}"
    elif os.environ.get(DATA_DIR_ENV, ""):
        env = os.environ[DATA_DIR_ENV]
        path, origin, name = Path(env).expanduser(), DATA_DIR_ENV, f"{DATA_DIR_ENV}={env}"
    else:
        return None, ""
    if not path.is_dir():
        looking = f" (looking for {dataset})" if dataset else ""
        raise DatasetUnavailableError(
            f"{name}: {'no such folder' if not path.exists() else 'not a folder'}{looking}; fix "
            "the path, or leave it unset to use the embedded MNIST copy or the hub")
    return path, origin


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


def content_key(files: dict[str, list[Path]], cache_dir: Path) -> list[list[Any]]:
    """(split, position, base name, SHA-256 of the bytes) of each file: the cache key of data
    read from local files.

    Content rather than (path, mtime), so two clones of the data, or one read-only copy mounted
    at several paths, map to one cache entry instead of one each. Position and name keep the
    shards' order, which the decoded tensors follow. Digests come through the index in
    ``cache_dir`` (see :func:`file_digests`), so repeat starts do not re-read the files.
    """
    digests = file_digests([p for paths in files.values() for p in paths], cache_dir)
    return [
        [split, i, p.name, digests[p]]
        for split, paths in files.items()
        for i, p in enumerate(paths)
    ]


# The side index: absolute path -> (stat stamp, sha256). Only an accelerator: cache names are
# made from the digests, never from the paths.
DIGEST_INDEX = "file-digests.json"


def file_digests(paths: Sequence[Path], cache_dir: Path) -> dict[Path, str]:
    """The SHA-256 (hex) of each file's bytes, read from ``<cache_dir>/file-digests.json`` when
    the file's stat stamp is unchanged since it was hashed, else computed and recorded there.

    Nothing is ever written beside the data (it may be read-only); an unwritable cache folder
    only means hashing again next time. The lock makes concurrent ranks hash once.
    """
    index_path = cache_dir / DIGEST_INDEX
    with cache_lock(index_path):
        index = _read_digest_index(index_path)
        out: dict[Path, str] = {}
        changed = False
        for p in paths:
            name, stamp = str(p.resolve()), _stat_stamp(p)
            entry = index.get(name)
            if isinstance(entry, dict) and entry.get("stat") == stamp and _is_sha256(
                entry.get("sha256")
            ):
                out[p] = entry["sha256"]
                continue
            try:
                out[p] = sha256_file(p)
            except OSError as exc:
                raise DataError(f"cannot read {p} ({exc.strerror or exc}): check its "
                                "permissions, or point data.root elsewhere") from None
            index[name] = {"stat": stamp, "sha256": out[p]}
            changed = True
        if changed:
            _write_digest_index(index_path, index)
    return out


def _stat_stamp(path: Path) -> list[int]:
    # ctime and inode besides size and mtime: `touch -d`/`os.utime` can put an mtime back, and
    # a file replaced by a rename has another inode; either way the file is hashed again.
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(
        c in "0123456789abcdef" for c in value
    )


def _read_digest_index(path: Path) -> dict[str, Any]:
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:  # a damaged index only costs re-hashing
        logger.debug("ignoring unreadable digest index %s: %s", path, exc)
        return {}
    return index if isinstance(index, dict) else {}


def _write_digest_index(path: Path, index: dict[str, Any]) -> None:
    # Entries of files that are gone (deleted clones, temp folders) are dropped so the index
    # does not grow without bound; one on an unmounted disk is merely hashed again later.
    kept = {name: entry for name, entry in index.items() if os.path.exists(name)}
    try:
        atomic_write_text(path, json.dumps(kept, indent=1, sort_keys=True))
    except OSError as exc:  # the data is still loaded; save_cache warns about the folder
        logger.debug("cannot write digest index %s: %s", path, exc)


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


def save_cache(path: Path, payload: dict[str, Any], key: Any, stacklevel: int) -> None:
    """``torch.save`` to a temp file in the same folder, then rename: readers never see a
    half-written file. ``key`` (what the file name was made from) and a checksum of everything
    are stored with the payload, for :func:`load_cache` to verify. A failure only warns, once
    per folder (the data is still returned, just not cached); ``stacklevel`` is as for
    ``warnings.warn`` called in save_cache's caller."""
    stored = {**payload, "key": _plain(key)}
    stored["sha256"] = payload_digest(stored)
    try:
        atomic_save(stored, path)
    except (OSError, RuntimeError) as exc:
        _warn_cache_once(path.parent, "cannot write", exc, stacklevel + 1)


def load_cache(path: Path, key: Any) -> dict[str, Any]:
    """The payload :func:`save_cache` wrote to ``path`` for ``key``, checked.

    Raises (any exception: a truncated file fails inside torch.load) when the file is not a
    torch file, lacks the checksum, fails it, or was written for another key (a file copied
    or renamed from another entry); the caller then rebuilds it and calls
    :func:`warn_bad_cache`. Callers still check types and shapes: the checksum proves the
    bytes are as written, not that what was written is right for today's code.
    """
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, garbage, not a zip: torch's messages run long
        logger.debug("torch.load(%s) failed: %s", path, exc)
        raise ValueError(f"not a readable torch file: {type(exc).__name__}") from exc
    if not isinstance(payload, dict) or "sha256" not in payload:
        raise ValueError("no checksum (not a grape_dist cache file)")
    stored = payload.pop("sha256")
    if payload_digest(payload) != stored:
        raise ValueError("checksum mismatch (the file was altered or damaged)")
    if payload.pop("key", None) != _plain(key):
        raise ValueError("written for other source data")
    return payload


def warn_bad_cache(path: Path, exc: BaseException, stacklevel: int) -> None:
    """Say that the cache file ``path`` is being ignored and rebuilt; ``stacklevel`` as for
    ``warnings.warn`` called in warn_bad_cache's caller."""
    reason = (str(exc).strip().splitlines() or [""])[0][:200]  # keep it to one line
    warnings.warn(
        f"grape_dist: ignoring corrupt or mismatched cache file {path} ({reason}); "
        "rebuilding it",
        RuntimeWarning,
        stacklevel=stacklevel + 1,
    )


def payload_digest(payload: Mapping[str, Any]) -> str:
    """SHA-256 over a cache payload: each entry's name, then a tensor's dtype, shape and bytes
    or any other value's JSON. ~20 ms per 50 MB, small next to reading the file."""
    h = hashlib.sha256()
    for name in sorted(payload):
        value = payload[name]
        h.update(name.encode() + b"\0")
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}\0".encode())
            h.update(t.numpy())  # the tensor's memory, no copy
        else:
            h.update(json.dumps(value, sort_keys=True).encode())
        h.update(b"\0")
    return h.hexdigest()


def _plain(value: Any) -> Any:
    # What torch.load gives back for a key: JSON types only (tuples become lists).
    return json.loads(json.dumps(value, sort_keys=True))


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
