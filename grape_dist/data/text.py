"""Text corpora for the language model, at character level.

A corpus is a train and a test text (the Shakespeare copy: `train.txt`, and `test.txt` =
Macbeth and Twelfth Night; `validation.txt` is not used). The tokeniser is the identity on
ASCII: token = character code (128 classes), so nothing is downloaded or trained and the
vocabulary is known before any data is read (every rank builds the model first). A character
outside ASCII is an error naming where it is.

Each split is cut into consecutive windows of `seq_len` tokens: sample i is
`tokens[i*T : (i+1)*T]` and its targets the same window shifted by one. The trainer treats the
windows like images: shuffled, batched, split into micro-batches and over replicas by row.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

VOCAB = 128  # ASCII


@dataclass(frozen=True)
class TextSource:
    name: str
    subdir: str  # folder under the data root
    files: dict[str, str]  # split -> file name


TEXT_SOURCES = {
    "shakespeare": TextSource("shakespeare", "shakespeare",
                              {"train": "train.txt", "test": "test.txt"}),
}


class TextDataUnavailableError(RuntimeError):
    """The corpus is not under the data root; the message says where it looked."""


@dataclass(frozen=True)
class TextDataset:
    name: str
    train_x: torch.Tensor  # int64, windows x seq_len
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    source: str


def encode(text: str, where: str = "text") -> torch.Tensor:
    """Character codes as int64 token ids; refuses non-ASCII text."""
    data = text.encode("ascii", errors="strict") if text.isascii() else None
    if data is None:
        pos = next(i for i, ch in enumerate(text) if ord(ch) >= VOCAB)
        raise ValueError(f"{where}: character {text[pos]!r} at offset {pos} is not ASCII; the "
                         "character-level tokeniser covers the 128 ASCII codes")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)


def decode(ids: torch.Tensor) -> str:
    return bytes(ids.to(torch.uint8).tolist()).decode("ascii")


def windows(ids: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, next-token targets), each (n, seq_len), from consecutive windows of `ids`."""
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise ValueError(f"{len(ids)} tokens make no window of {seq_len} + 1")
    return ids[:n * seq_len].view(n, seq_len), ids[1:n * seq_len + 1].view(n, seq_len)


def _resolve_root(root: str | os.PathLike[str] | None) -> Path | None:
    value = root if root is not None else os.environ.get("GRAPE_DATA_DIR")
    return Path(value).expanduser() if value else None


def load_text_dataset(name: str, root: str | os.PathLike[str] | None,
                      seq_len: int) -> TextDataset:
    """The corpus `name` from `root` (or $GRAPE_DATA_DIR), cut into windows of `seq_len`."""
    src = TEXT_SOURCES[name]
    base = _resolve_root(root)
    if base is None:
        raise TextDataUnavailableError(
            f"dataset {name!r} is read from a local copy: set data.root (or GRAPE_DATA_DIR) to "
            f"the folder holding {src.subdir}/{src.files['train']}")
    folder = base / src.subdir
    missing = [f for f in src.files.values() if not (folder / f).is_file()]
    if missing:
        raise TextDataUnavailableError(
            f"dataset {name!r}: {', '.join(missing)} not found in {folder}; data.root must hold "
            f"{src.subdir}/{{{','.join(src.files.values())}}}")
    parts = {}
    for split, file in src.files.items():
        text = (folder / file).read_text(encoding="utf-8")
        parts[split] = windows(encode(text, str(folder / file)), seq_len)
    return TextDataset(name, *parts["train"], *parts["test"], str(folder))
