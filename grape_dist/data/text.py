"""Text corpora for the language model, and tokenisers that work offline.

Corpora (``TEXT_SOURCES``):

- ``shakespeare``: plain text under the data root only, ``<root>/shakespeare/train.txt`` and
  ``test.txt`` (Macbeth, Twelfth Night), the evaluated split; ``validation.txt`` is not used.
- ``wikitext103``, ``wikitext2``: the hub's ``Salesforce/wikitext``, configs
  ``wikitext-103-raw-v1`` and ``wikitext-2-raw-v1``: parquet files with one column ``text``, one
  row per line of the original files (blank lines are empty rows). Read from
  ``<root>/wikitext/<config>/{train,validation}-*.parquet`` (the hub repo's own folders) when
  that exists, else from the hub if it is reachable (checked first, as for the images). The
  evaluated split is ``validation``: the paper's Table 4 reports validation perplexity (as do
  Launay et al. 2020); ``test`` is never read.

Tokenisers (``data.tokenizer``); the vocabulary size is known from the config alone, before any
data is read, because every rank builds the model first:

- ``char``: the identity on ASCII, token = character code (128 ids). A character outside ASCII
  is an error naming where it is. Shakespeare's default.
- ``byte``: the UTF-8 bytes (256 ids): any text, nothing to train.
- ``word``: words split at whitespace (WikiText is pre-tokenised: punctuation is already
  separated), each line followed by ``<eos>`` as in Merity et al. 2017. The vocabulary is
  ``<unk>`` (id 0), ``<eos>`` (id 1), then the ``data.vocab_size - 2`` most frequent words of
  the training split, by count then by code point order (so every rank builds the same one);
  every other word is ``<unk>``. Counting WikiText-103's 103 M words takes a while, so the
  vocabulary and the encoded splits are cached beside the decoded images
  (``$GRAPE_CACHE_DIR``), keyed by the source files' content (SHA-256, not their path) or the
  hub id, with a checksum inside: a damaged cache file is rebuilt, with a warning.

Rows of a parquet corpus become text by ending each row with ``"\\n"`` unless it already ends
with one (the hub's WikiText rows do, blank rows are empty) for ``char`` and ``byte``; ``word``
ends each row with ``<eos>``. Each split is then cut into consecutive windows of ``seq_len``
tokens: sample i is ``tokens[i*T : (i+1)*T]`` and its targets the same window shifted by one.
The trainer treats the windows like images: shuffled, batched, split into micro-batches and over
replicas by row.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grape_dist.data.access import (
    DATA_DIR_ENV,
    DatasetFormatError,
    DatasetUnavailableError,
    cache_lock,
    content_key,
    find_split_files,
    hub_unreachable_reason,
    import_datasets,
    load_cache,
    offline,
    resolve_cache_dir,
    resolve_root,
    save_cache,
    warn_bad_cache,
)

logger = logging.getLogger(__name__)

VOCAB = 128  # the char tokeniser's vocabulary: ASCII
BYTE_VOCAB = 256
TOKENIZERS = ("char", "byte", "word")
UNK, EOS = "<unk>", "<eos>"
UNK_ID, EOS_ID = 0, 1

# Bump whenever tokenisation or the cached layout changes, so old cache files stop matching.
# 2: keyed by content, with the key and a checksum stored inside.
_CACHE_FORMAT = 2


@dataclass(frozen=True)
class TextSource:
    """Where a corpus lives and which split a run evaluates on."""

    name: str
    subdir: str  # folder under the data root
    eval_split: str  # the split the trainer's "test" rows come from
    files: dict[str, str] | None = None  # plain-text corpus: split -> file name in `subdir`
    hub_id: str | None = None  # parquet corpus on the hub (and in `subdir` locally)
    hub_config: str | None = None
    text_column: str = "text"
    ascii: bool = False  # whether the char tokeniser covers it


TEXT_SOURCES: dict[str, TextSource] = {
    "shakespeare": TextSource(
        "shakespeare", "shakespeare", "test", files={"train": "train.txt", "test": "test.txt"},
        ascii=True),
    "wikitext103": TextSource(
        "wikitext103", "wikitext/wikitext-103-raw-v1", "validation",
        hub_id="Salesforce/wikitext", hub_config="wikitext-103-raw-v1"),
    "wikitext2": TextSource(
        "wikitext2", "wikitext/wikitext-2-raw-v1", "validation",
        hub_id="Salesforce/wikitext", hub_config="wikitext-2-raw-v1"),
}


class TextDataUnavailableError(DatasetUnavailableError):
    """The corpus is neither under the data root nor reachable; the message says where it
    looked and what layout it expects."""


@dataclass(frozen=True)
class TextDataset:
    """Both splits cut into windows, and the tokeniser that made them."""

    name: str
    train_x: torch.Tensor  # int64, windows x seq_len
    train_y: torch.Tensor
    test_x: torch.Tensor  # windows of the evaluated split (`eval_split`)
    test_y: torch.Tensor
    source: str
    eval_split: str = "test"
    vocab_size: int = VOCAB  # the model's number of classes
    tokenizer: Tokenizer | None = None


def text_dataset_names() -> list[str]:
    """Names accepted by :func:`load_text_dataset`, sorted."""
    return sorted(TEXT_SOURCES)


def get_text_source(name: str) -> TextSource:
    try:
        return TEXT_SOURCES[name]
    except KeyError:
        raise KeyError(f"unknown text dataset {name!r}; known text datasets: "
                       f"{', '.join(text_dataset_names())}") from None


def tokenizer_vocab_size(tokenizer: str, vocab_size: int = 0) -> int:
    """The number of token ids (the model's classes) of `tokenizer`, from the config alone.

    `vocab_size` is the word tokeniser's size (``<unk>``, ``<eos>`` and the most frequent
    words); char and byte have fixed vocabularies and take 0 (unset).
    """
    if tokenizer == "char":
        fixed = VOCAB
    elif tokenizer == "byte":
        fixed = BYTE_VOCAB
    elif tokenizer == "word":
        if vocab_size < 3:
            raise ValueError(f"the word tokeniser needs vocab_size >= 3 ({UNK}, {EOS} and at "
                             f"least one word), got {vocab_size}")
        return vocab_size
    else:
        raise ValueError(f"unknown tokenizer {tokenizer!r}; allowed: {', '.join(TOKENIZERS)}")
    if vocab_size not in (0, fixed):
        raise ValueError(f"the {tokenizer} tokeniser has a fixed vocabulary of {fixed}; "
                         f"vocab_size must be 0 (unset), got {vocab_size}")
    return fixed


# --------------------------------------------------------------------------------------------
# Tokenisers


class Tokenizer(ABC):
    """Text <-> int64 token ids, offline; `vocab_size` ids in [0, vocab_size)."""

    name: str
    vocab_size: int

    @abstractmethod
    def encode(self, text: str, where: str = "text") -> torch.Tensor:
        """Token ids of `text` (int64, 1-D); `where` names the text in error messages."""

    @abstractmethod
    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        """The text of token ids."""

    def encode_rows(self, rows: Any, where: str) -> torch.Tensor:
        """Token ids of a corpus given as rows, one line each (a pyarrow string array)."""
        return self.encode(_rows_text(rows), where)


def _ids(data: bytes) -> torch.Tensor:
    if not data:  # torch.frombuffer refuses an empty buffer
        return torch.empty(0, dtype=torch.int64)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).to(torch.int64)


def encode(text: str, where: str = "text") -> torch.Tensor:
    """Character codes as int64 token ids; refuses non-ASCII text."""
    if not text.isascii():
        pos = next(i for i, ch in enumerate(text) if ord(ch) >= VOCAB)
        raise ValueError(f"{where}: character {text[pos]!r} at offset {pos} is not ASCII; the "
                         "character-level tokeniser covers the 128 ASCII codes (data.tokenizer="
                         "byte covers any text)")
    return _ids(text.encode("ascii"))


def decode(ids: torch.Tensor | Sequence[int]) -> str:
    return bytes(torch.as_tensor(ids).to(torch.uint8).tolist()).decode("ascii")


class CharTokenizer(Tokenizer):
    name = "char"
    vocab_size = VOCAB

    def encode(self, text: str, where: str = "text") -> torch.Tensor:
        return encode(text, where)

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        return decode(ids)


class ByteTokenizer(Tokenizer):
    name = "byte"
    vocab_size = BYTE_VOCAB

    def encode(self, text: str, where: str = "text") -> torch.Tensor:
        return _ids(text.encode("utf-8"))

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        # A model's samples need not be valid UTF-8: undecodable bytes become U+FFFD.
        return bytes(torch.as_tensor(ids).to(torch.uint8).tolist()).decode("utf-8", "replace")


class WordTokenizer(Tokenizer):
    """Whitespace-separated words, each line ended by ``<eos>``; ``vocab[i]`` is id i's word,
    ``vocab[0] = <unk>`` and ``vocab[1] = <eos>``. `vocab_size` may exceed ``len(vocab)`` (a
    corpus with fewer distinct words than asked for): the extra ids are never produced."""

    name = "word"

    def __init__(self, vocab: Sequence[str], vocab_size: int | None = None) -> None:
        vocab = list(vocab)
        if vocab[:2] != [UNK, EOS]:
            raise ValueError(f"a word vocabulary starts with {UNK}, {EOS}; got {vocab[:2]}")
        if len(set(vocab)) != len(vocab):
            raise ValueError("the word vocabulary has repeated words")
        self.vocab = vocab
        self.vocab_size = len(vocab) if vocab_size is None else vocab_size
        if self.vocab_size < len(vocab):
            raise ValueError(f"{len(vocab)} words do not fit vocab_size={self.vocab_size}")
        self._lookup: Any = None  # the vocabulary as a pyarrow array, built on first use

    @classmethod
    def from_rows(cls, rows: Any, vocab_size: int) -> WordTokenizer:
        """The vocabulary of the `vocab_size - 2` most frequent words of `rows`."""
        return cls(_rank_words(_words(rows), vocab_size), vocab_size)

    def encode(self, text: str, where: str = "text") -> torch.Tensor:
        import pyarrow as pa

        return self.encode_rows(pa.array(text.splitlines(), type=pa.large_string()), where)

    def encode_rows(self, rows: Any, where: str = "text") -> torch.Tensor:
        return self.encode_words(_words(rows))

    def encode_words(self, words: Any) -> torch.Tensor:
        """Ids of the words `_words` split off (``<eos>`` included)."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if self._lookup is None:
            self._lookup = pa.array(self.vocab, type=pa.large_string())
        # Position in the vocabulary, i.e. the id; words outside it are <unk>.
        idx = pc.index_in(words, value_set=self._lookup).fill_null(UNK_ID)
        return torch.from_numpy(idx.to_numpy(zero_copy_only=False).astype("int64"))

    def decode(self, ids: torch.Tensor | Sequence[int]) -> str:
        lines, line = [], []
        for i in torch.as_tensor(ids).tolist():
            if i == EOS_ID:
                lines.append(" ".join(line) + "\n")
                line = []
            else:
                line.append(self.vocab[i] if 0 <= i < len(self.vocab) else UNK)
        return "".join(lines) + " ".join(line)


def make_tokenizer(tokenizer: str, vocab_size: int = 0) -> Tokenizer:
    """char or byte (word tokenisers are built from a corpus: ``WordTokenizer.from_rows``)."""
    tokenizer_vocab_size(tokenizer, vocab_size)
    if tokenizer == "char":
        return CharTokenizer()
    if tokenizer == "byte":
        return ByteTokenizer()
    raise ValueError("a word tokeniser is built from its training text: WordTokenizer.from_rows")


def _rows_text(rows: Any) -> str:
    """One text from rows that are lines: each ends with a newline, added where missing (the
    hub's WikiText rows keep theirs; blank rows are empty, missing ones count as blank)."""
    lines = (row or "" for row in rows.to_pylist())
    return "".join(line if line.endswith("\n") else line + "\n" for line in lines)


def _words(rows: Any) -> Any:
    """Every word of `rows` (pyarrow strings or a list, one line each) in order, ``<eos>`` after
    each row.

    Split like ``str.split()`` (runs of Unicode whitespace), in Arrow's C++ kernels: WikiText-103
    has 103 M words, far too many for a Python loop.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(rows, (list, tuple)):
        rows = pa.array(rows, type=pa.large_string())
    if isinstance(rows, pa.ChunkedArray):
        rows = rows.combine_chunks() if rows.num_chunks else pa.array([], pa.string())
    # large_string: 64-bit offsets, so no 2 GiB limit on a split's text.
    rows = pc.utf8_trim_whitespace(rows.cast(pa.large_string()).fill_null(""))
    sep = pa.scalar(" ", pa.large_string())
    lines = pc.binary_join_element_wise(rows, pa.scalar(EOS, pa.large_string()), sep)
    words = pc.list_flatten(pc.utf8_split_whitespace(lines))
    # A blank row gives " <eos>", whose split starts with an empty string.
    return words.filter(pc.not_equal(words, ""))


def _rank_words(words: Any, vocab_size: int) -> list[str]:
    """[<unk>, <eos>, the `vocab_size - 2` most frequent words]: by count, then code point
    order (Arrow compares strings as UTF-8 bytes, which orders them by code point)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    counts = pc.value_counts(words)
    table = pa.table({"word": counts.field("values"), "count": counts.field("counts")})
    specials = pa.array([UNK, EOS], type=table["word"].type)
    table = table.filter(pc.invert(pc.is_in(table["word"], value_set=specials)))
    order = pc.sort_indices(table, sort_keys=[("count", "descending"), ("word", "ascending")])
    top = table["word"].take(order[: vocab_size - 2])
    return [UNK, EOS, *top.to_pylist()]


def windows(ids: torch.Tensor, seq_len: int,
            where: str = "text") -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, next-token targets), each (n, seq_len), from consecutive windows of `ids`."""
    n = (len(ids) - 1) // seq_len
    if n < 1:
        raise ValueError(f"{where}: {len(ids)} tokens make no window of {seq_len} + 1")
    return ids[:n * seq_len].view(n, seq_len), ids[1:n * seq_len + 1].view(n, seq_len)


# --------------------------------------------------------------------------------------------
# Loading


@dataclass
class _Corpus:
    """A corpus found but not read yet."""

    described: str  # where it is, for messages and TextDataset.source
    # What identifies its content, for the cache, given the cache folder (which holds the
    # file-digest index). Lazy: only the word tokeniser caches, so only it pays for hashing.
    key: Callable[[Path], dict[str, Any]]
    read: Callable[[], dict[str, Any]]  # split -> str (plain text) or rows (pyarrow strings)


def load_text_dataset(name: str, root: str | os.PathLike[str] | None, seq_len: int,
                      tokenizer: str = "char", vocab_size: int = 0,
                      cache_dir: str | os.PathLike[str] | None = None) -> TextDataset:
    """The corpus `name`, tokenised by `tokenizer` and cut into windows of `seq_len`.

    `root`: the data folder (defaults to ``$GRAPE_DATA_DIR``); `vocab_size`: the word
    tokeniser's; `cache_dir`: where word vocabularies and encodings are cached (defaults to
    ``$GRAPE_CACHE_DIR``, then ``~/.cache/grape_dist``). Raises
    :class:`TextDataUnavailableError` when the corpus is neither local nor reachable.
    """
    src = get_text_source(name)
    n_ids = tokenizer_vocab_size(tokenizer, vocab_size)
    if tokenizer == "char" and not src.ascii:
        raise ValueError(f"dataset {name!r} is not ASCII text, which the char tokeniser "
                         "requires; use data.tokenizer=byte or word")
    corpus = _find_corpus(src, root)
    splits = ("train", src.eval_split)
    tok: Tokenizer
    if tokenizer == "word":
        tok, ids, source = _word_ids(src, corpus, n_ids, resolve_cache_dir(cache_dir))
    else:
        tok, source = make_tokenizer(tokenizer), corpus.described
        texts = corpus.read()
        ids = {}
        for split in splits:
            where = f"{corpus.described}, split {split}"
            text = texts[split]
            ids[split] = (tok.encode(text, where) if isinstance(text, str)
                          else tok.encode_rows(text, where))
    train = windows(ids["train"], seq_len, f"{name} train")
    test = windows(ids[src.eval_split], seq_len, f"{name} {src.eval_split}")
    return TextDataset(name, *train, *test, source, eval_split=src.eval_split,
                       vocab_size=n_ids, tokenizer=tok)


def _find_corpus(src: TextSource, root: str | os.PathLike[str] | None) -> _Corpus:
    base, origin = resolve_root(root, src.name)
    if src.files is not None:
        return _plain_text_corpus(src, base)
    looked: list[str] = []
    if base is not None:
        folder = base / src.subdir
        looked.append(f"{folder} ({origin})")
        try:
            files = find_split_files(folder, "train", src.eval_split)
        except DatasetUnavailableError as exc:
            raise TextDataUnavailableError(f"dataset {src.name!r}: {exc}") from None
        if files is not None:
            return _local_parquet_corpus(src, folder, origin, files)
    return _hub_corpus(src, looked)


def _plain_text_corpus(src: TextSource, base: Path | None) -> _Corpus:
    assert src.files is not None
    if base is None:
        raise TextDataUnavailableError(
            f"dataset {src.name!r} is read from a local copy: set data.root (or "
            f"{DATA_DIR_ENV}) to the folder holding {src.subdir}/{src.files['train']}")
    folder = base / src.subdir
    missing = [f for f in src.files.values() if not (folder / f).is_file()]
    if missing:
        raise TextDataUnavailableError(
            f"dataset {src.name!r}: {', '.join(missing)} not found in {folder}; data.root must "
            f"hold {src.subdir}/{{{','.join(src.files.values())}}}")
    paths = {split: folder / file for split, file in src.files.items()}

    def read() -> dict[str, Any]:
        return {split: p.read_text(encoding="utf-8") for split, p in paths.items()}

    def key(cache_root: Path) -> dict[str, Any]:
        return {"files": content_key({s: [p] for s, p in paths.items()}, cache_root)}

    return _Corpus(str(folder), key, read)


def _local_parquet_corpus(src: TextSource, folder: Path, origin: str,
                          files: dict[str, list[Path]]) -> _Corpus:
    def read() -> dict[str, Any]:
        datasets = import_datasets()
        data_files = {split: [str(p) for p in paths] for split, paths in files.items()}
        with offline(datasets):
            dsd = datasets.load_dataset("parquet", data_files=data_files)
        return _text_columns(src, dsd)

    def key(cache_root: Path) -> dict[str, Any]:
        return {"files": content_key(files, cache_root)}

    return _Corpus(f"parquet files in {folder} ({origin})", key, read)


def _hub_corpus(src: TextSource, looked: list[str]) -> _Corpus:
    assert src.hub_id is not None

    def read() -> dict[str, Any]:
        datasets = import_datasets()
        reason = hub_unreachable_reason(datasets)
        if reason is not None:
            raise TextDataUnavailableError(_unavailable_message(src, looked, reason))
        try:
            dsd = datasets.load_dataset(src.hub_id, src.hub_config)
        except Exception as exc:  # network, auth and missing-repo errors all end up here
            raise TextDataUnavailableError(_unavailable_message(
                src, looked, f"loading {src.hub_id} ({src.hub_config}) failed: {exc}")) from exc
        return _text_columns(src, dsd)

    def key(cache_root: Path) -> dict[str, Any]:
        return {"hub_id": src.hub_id, "config": src.hub_config}

    return _Corpus(f"hub dataset {src.hub_id} ({src.hub_config})", key, read)


def _text_columns(src: TextSource, dsd: Any) -> dict[str, Any]:
    out = {}
    for split in ("train", src.eval_split):
        ds = dsd[split]
        if src.text_column not in ds.column_names:
            raise DatasetFormatError(
                f"{src.name} {split}: no column {src.text_column!r} (columns: "
                f"{ds.column_names}); the files must be the hub's parquet export of "
                f"{src.hub_id}: check data.root or ${DATA_DIR_ENV}")
        out[split] = ds.select_columns([src.text_column]).with_format("arrow")[:].column(0)
    return out


def _unavailable_message(src: TextSource, looked: list[str], reason: str) -> str:
    where = "; ".join(looked) if looked else f"nowhere (no root given and {DATA_DIR_ENV} unset)"
    return (
        f"dataset {src.name!r} is not available: no local copy was found (looked in: {where}) "
        f"and the Hugging Face hub cannot be used for {src.hub_id} (config {src.hub_config}): "
        f"{reason}. To provide the data, set {DATA_DIR_ENV} (or `data.root` in the config) to "
        f"a folder containing {src.subdir}/train-*.parquet and "
        f"{src.subdir}/{src.eval_split}-*.parquet (the layout of the hub's parquet export of "
        f"{src.hub_id}, config {src.hub_config}), or go online."
    )


# --------------------------------------------------------------------------------------------
# The word tokeniser's vocabulary and encodings, cached


def _word_ids(src: TextSource, corpus: _Corpus, vocab_size: int,
              cache_root: Path) -> tuple[WordTokenizer, dict[str, torch.Tensor], str]:
    key = {"format": _CACHE_FORMAT, "name": src.name, "tokenizer": "word",
           "vocab_size": vocab_size, "eval_split": src.eval_split, **corpus.key(cache_root)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    path = cache_root / f"{src.name}-word{vocab_size}-{digest}.pt"
    splits = ("train", src.eval_split)
    # The lock makes concurrent ranks on one machine count once and read the cache after.
    with cache_lock(path):
        cached = _read_word_cache(path, key, vocab_size, splits)
        if cached is not None:
            tok, ids = cached
            return tok, ids, f"{corpus.described}, word cache {path}"

        texts = corpus.read()
        start = time.perf_counter()
        rows = {s: t if not isinstance(t, str) else _lines(t) for s, t in texts.items()}
        train_words = _words(rows["train"])
        # Built from the training split only: the evaluated text must not choose the words.
        tok = WordTokenizer(_rank_words(train_words, vocab_size), vocab_size)
        ids = {"train": tok.encode_words(train_words),
               src.eval_split: tok.encode_rows(rows[src.eval_split])}
        if len(tok.vocab) < vocab_size:
            logger.warning("%s has %d distinct training words: ids %d..%d of vocab_size=%d "
                           "are never used", src.name, len(tok.vocab) - 2, len(tok.vocab),
                           vocab_size - 1, vocab_size)
        logger.info("%s: word vocabulary of %d and %d + %d tokens in %.1f s", src.name,
                    len(tok.vocab), len(ids["train"]), len(ids[src.eval_split]),
                    time.perf_counter() - start)
        payload = {"format": _CACHE_FORMAT, "vocab": tok.vocab,
                   **{f"ids_{s}": ids[s].to(torch.int32) for s in splits}}
        # Warnings point at load_text_dataset's caller (_word_ids is 1 frame up).
        save_cache(path, payload, key, stacklevel=3)
        return tok, ids, corpus.described


def _lines(text: str) -> Any:
    import pyarrow as pa

    return pa.array(text.splitlines(), type=pa.large_string())


def _read_word_cache(path: Path, key: dict[str, Any], vocab_size: int, splits: Sequence[str]
                     ) -> tuple[WordTokenizer, dict[str, torch.Tensor]] | None:
    if not path.is_file():
        return None
    try:
        payload = load_cache(path, key)  # checksum and key
        if payload.get("format") != _CACHE_FORMAT:
            raise ValueError(f"cache format {payload.get('format')!r} != {_CACHE_FORMAT}")
        vocab = payload["vocab"]
        if not (isinstance(vocab, list) and all(isinstance(w, str) for w in vocab)):
            raise ValueError("vocab is not a list of words")
        tok = WordTokenizer(vocab, vocab_size)
        ids = {}
        for s in splits:
            t = payload[f"ids_{s}"]
            if not (isinstance(t, torch.Tensor) and t.dtype == torch.int32 and t.dim() == 1):
                raise ValueError(f"unexpected {s} ids")
            ids[s] = t.to(torch.int64)
    except Exception as exc:  # any unreadable cache is just built again
        # Warnings point at load_text_dataset's caller: _read_word_cache, _word_ids,
        # load_text_dataset, then the caller.
        warn_bad_cache(path, exc, stacklevel=4)
        return None
    return tok, ids
