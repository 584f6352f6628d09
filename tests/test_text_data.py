"""Text corpora and tokenisers (grape_dist.data.text) on small files in the hub's schema.

WikiText is not on this machine: the tests write `wikitext/<config>/{train,validation}-*.parquet`
as the hub repo Salesforce/wikitext has them (one string column `text`, one row per line, blank
lines as empty rows, headings like " = Title = ") through `datasets` itself, and read them back
through the real `datasets` library (no mocks).
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from grape_dist.config import ConfigError, load_config
from grape_dist.data.text import (
    EOS,
    EOS_ID,
    UNK,
    UNK_ID,
    ByteTokenizer,
    CharTokenizer,
    TextDataUnavailableError,
    WordTokenizer,
    load_text_dataset,
    text_dataset_names,
    tokenizer_vocab_size,
)

CONFIGS = {"wikitext103": "wikitext-103-raw-v1", "wikitext2": "wikitext-2-raw-v1"}

# Like the hub's rows: a blank line is "", every other line ends with " \n".
TRAIN_ROWS = [
    "", " = Valkyria Chronicles = \n", "",
    " the cat sat on the mat . \n",
    " the dog sat on the cat . \n", "",
    " = = Plot = = \n", "",
    " Senjō no Valkyria : 戦場のヴァルキュリア , the cat ran . \n",
]
VALID_ROWS = ["", " = Other = \n", "", " the bird sat on the bird . \n", " bird bird \n"]


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The developer's own data/cache settings must not leak into what a test resolves.
    monkeypatch.delenv("GRAPE_DATA_DIR", raising=False)
    monkeypatch.delenv("GRAPE_CACHE_DIR", raising=False)


def write_wikitext(root: Path, name: str = "wikitext103", train: list[str] = TRAIN_ROWS,
                   valid: list[str] | None = VALID_ROWS) -> Path:
    """<root>/wikitext/<config>/{train,validation}-00000-of-00001.parquet written by
    `datasets` (so they carry its feature metadata), plus a `test` file that is not parquet at
    all: only the training and the evaluated split may ever be read."""
    import datasets

    folder = root / "wikitext" / CONFIGS[name]
    folder.mkdir(parents=True)
    features = datasets.Features({"text": datasets.Value("string")})
    for split, rows in (("train", train), ("validation", valid)):
        if rows is not None:
            datasets.Dataset.from_dict({"text": rows}, features=features).to_parquet(
                str(folder / f"{split}-00000-of-00001.parquet"))
    (folder / "test-00000-of-00001.parquet").write_bytes(b"the test split is never read")
    return folder


def as_text(rows: list[str]) -> str:
    """What the byte/char tokenisers see: every row ends with one newline."""
    return "".join(r if r.endswith("\n") else r + "\n" for r in rows)


# --------------------------------------------------------------------------------------------
# Tokenisers


def test_vocab_sizes_come_from_the_config_alone() -> None:
    assert tokenizer_vocab_size("char") == 128
    assert tokenizer_vocab_size("byte") == 256
    assert tokenizer_vocab_size("word", 5000) == 5000
    for bad, match in ((("word", 2), "vocab_size >= 3"), (("byte", 300), "fixed vocabulary"),
                       (("bpe", 0), "allowed: char, byte, word")):
        with pytest.raises(ValueError, match=match):
            tokenizer_vocab_size(*bad)


def test_byte_tokenizer_round_trips_any_text() -> None:
    tok = ByteTokenizer()
    text = " Senjō no Valkyria 3 : 戦場のヴァルキュリア3 — naïve café \n\n = = x = = \n"
    ids = tok.encode(text)
    assert ids.dtype == torch.int64 and len(ids) == len(text.encode("utf-8"))
    assert 0 <= int(ids.min()) and int(ids.max()) < 256
    assert tok.decode(ids) == text
    assert tok.encode("").shape == (0,) and tok.decode([]) == ""
    # The char tokeniser is the identity on ASCII and refuses the rest, saying where.
    assert CharTokenizer().decode(CharTokenizer().encode("The cat.\n")) == "The cat.\n"
    with pytest.raises(ValueError, match="'ō' at offset 4 is not ASCII"):
        CharTokenizer().encode("Senjō")


def test_word_vocabulary_by_frequency_then_code_point() -> None:
    rows = pa.array(["b a a c \n", "c b a", "", "e d <unk>"])
    # Counts: a 3, b 2, c 2, d 1, e 1 (and <eos> 4, literal <unk> 1: reserved, never ranked).
    tok = WordTokenizer.from_rows(rows, 6)
    assert tok.vocab == [UNK, EOS, "a", "b", "c", "d"]  # b/c and d/e: ties by code point
    assert tok.vocab_size == 6
    assert tok.encode("e a z\n<unk> d").tolist() == [UNK_ID, 2, UNK_ID, EOS_ID, UNK_ID, 5,
                                                      EOS_ID]
    # Every line ends with <eos>, a blank one included; ids round-trip to normalised text.
    ids = tok.encode_rows(rows)
    assert ids.tolist() == [3, 2, 2, 4, 1, 4, 3, 2, 1, 1, 0, 5, 0, 1]
    assert tok.decode(ids) == "b a a c\nc b a\n\n<unk> d <unk>\n"
    assert tok.decode(tok.encode("a  b\tc\n")) == "a b c\n"
    # Deterministic: the order of the rows does not change the vocabulary.
    assert WordTokenizer.from_rows(pa.array(rows.to_pylist()[::-1]), 6).vocab == tok.vocab
    # Asking for more words than the corpus has keeps the size (the model's classes).
    big = WordTokenizer.from_rows(rows, 50)
    assert big.vocab_size == 50 and len(big.vocab) == 7


# --------------------------------------------------------------------------------------------
# WikiText from parquet files in the hub's layout


@pytest.mark.parametrize("name", ["wikitext103", "wikitext2"])
def test_wikitext_bytes_windows_and_shifted_targets(tmp_path: Path, name: str) -> None:
    folder = write_wikitext(tmp_path / "data", name)
    ds = load_text_dataset(name, tmp_path / "data", 8, "byte", cache_dir=tmp_path / "c")
    assert ds.eval_split == "validation" and ds.vocab_size == 256
    assert str(folder) in ds.source
    train = torch.tensor(list(as_text(TRAIN_ROWS).encode("utf-8")))
    n = (len(train) - 1) // 8
    assert ds.train_x.shape == (n, 8) and ds.train_x.dtype == torch.int64
    assert torch.equal(ds.train_x.flatten(), train[: n * 8])
    # Targets: the next token, across window boundaries too.
    assert torch.equal(ds.train_y.flatten(), train[1: n * 8 + 1])
    assert torch.equal(ds.train_y[:-1, -1], ds.train_x[1:, 0])
    # The evaluated rows come from `validation`.
    valid = as_text(VALID_ROWS).encode("utf-8")
    assert bytes(ds.test_x.flatten().tolist()) == valid[: ds.test_x.numel()]
    assert ByteTokenizer().decode(ds.train_x[0]) == "\n = Valk"


def test_wikitext_words_vocabulary_from_train_only_and_cached(tmp_path: Path) -> None:
    write_wikitext(tmp_path / "data")
    cache = tmp_path / "cache"
    ds = load_text_dataset("wikitext103", tmp_path / "data", 4, "word", 8, cache_dir=cache)
    tok = ds.tokenizer
    assert isinstance(tok, WordTokenizer) and ds.vocab_size == 8
    # Training counts: = 6, the 5, . and cat 3, Valkyria, on and sat 2 (ties by code point:
    # sat is left out); "bird", frequent in validation only, is not in.
    assert tok.vocab == [UNK, EOS, "=", "the", ".", "cat", "Valkyria", "on"]
    assert tok.vocab == WordTokenizer.from_rows(pa.array(TRAIN_ROWS), 8).vocab
    words = ds.train_x.flatten().tolist() + ds.train_y[-1, -1:].tolist()
    assert tok.decode(words).startswith("\n= Valkyria <unk> =\n\nthe cat <unk> on the <unk> .\n")
    assert tok.decode(ds.test_x.flatten()).startswith("\n= <unk> =\n\nthe <unk> <unk> on the")
    (cache_file,) = cache.glob("wikitext103-word8-*.pt")
    # A second load reads the cache (no recount) and gives the same tensors and vocabulary.
    again = load_text_dataset("wikitext103", tmp_path / "data", 4, "word", 8, cache_dir=cache)
    assert "word cache" in again.source and "word cache" not in ds.source
    assert again.tokenizer.vocab == tok.vocab
    assert torch.equal(again.train_x, ds.train_x) and torch.equal(again.test_y, ds.test_y)
    # Another vocabulary size is another cache entry; an unreadable cache is rebuilt.
    load_text_dataset("wikitext103", tmp_path / "data", 4, "word", 5, cache_dir=cache)
    assert len(list(cache.glob("wikitext103-word*.pt"))) == 2
    cache_file.write_bytes(b"not a torch file")
    with pytest.warns(RuntimeWarning, match="cache"):
        rebuilt = load_text_dataset("wikitext103", tmp_path / "data", 4, "word", 8,
                                    cache_dir=cache)
    assert "word cache" not in rebuilt.source and torch.equal(rebuilt.train_x, ds.train_x)
    # Other training text is another cache entry, with its own vocabulary.
    write_wikitext(tmp_path / "other", train=[" bird bird cat \n"] * 9)
    other = load_text_dataset("wikitext103", tmp_path / "other", 4, "word", 8, cache_dir=cache)
    assert "word cache" not in other.source and other.tokenizer.vocab[2:4] == ["bird", "cat"]


def test_char_is_refused_for_wikitext_and_missing_validation_is_reported(
        tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not ASCII"):
        load_text_dataset("wikitext103", tmp_path, 8, "char")
    write_wikitext(tmp_path / "data", valid=None)
    with pytest.raises(TextDataUnavailableError, match=r"no validation-\*\.parquet files"):
        load_text_dataset("wikitext103", tmp_path / "data", 8, "byte")
    with pytest.raises(KeyError, match="known text datasets"):
        load_text_dataset("wikitext42", tmp_path, 8, "byte")
    assert text_dataset_names() == ["shakespeare", "wikitext103", "wikitext2"]


def test_unreachable_hub_names_the_hub_id_and_the_local_layout(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy"):
        monkeypatch.delenv(var, raising=False)
    # Nothing listens on the discard port locally: the probe is refused at once.
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(TextDataUnavailableError) as err:
        load_text_dataset("wikitext103", tmp_path, 8, "word", 100, cache_dir=tmp_path / "c")
    assert time.monotonic() - start < 5.0
    message = str(err.value)
    for part in ("Salesforce/wikitext", "config wikitext-103-raw-v1",
                 "cannot connect to 127.0.0.1:9",
                 str(tmp_path / "wikitext" / "wikitext-103-raw-v1"),
                 "wikitext/wikitext-103-raw-v1/train-*.parquet",
                 "wikitext/wikitext-103-raw-v1/validation-*.parquet", "GRAPE_DATA_DIR"):
        assert part in message, (part, message)


def test_shakespeare_with_byte_and_word_tokenizers(tmp_path: Path) -> None:
    folder = tmp_path / "shakespeare"
    folder.mkdir()
    (folder / "train.txt").write_text("To be, or not to be.\nTo sleep.\n" * 3)
    (folder / "test.txt").write_text("To be.\nNot to sleep.\n")
    char = load_text_dataset("shakespeare", tmp_path, 4)
    byte = load_text_dataset("shakespeare", tmp_path, 4, "byte")
    assert torch.equal(char.train_x, byte.train_x) and char.eval_split == "test"
    word = load_text_dataset("shakespeare", tmp_path, 3, "word", 6, cache_dir=tmp_path / "c")
    assert word.tokenizer.vocab == [UNK, EOS, "To", "be,", "be.", "not"]
    assert word.tokenizer.decode(word.test_x[0]) == "To be.\n"


# --------------------------------------------------------------------------------------------
# Configuration and the trainer


def test_config_checks_tokenizer_and_sizes_the_model_from_it() -> None:
    import typing

    from grape_dist.config import ASCII_TEXT_DATASETS, TEXT_DATASETS, DataConfig
    from grape_dist.data import TEXT_SOURCES, dataset_names
    from grape_dist.trainer import build_model_for

    # The config's lists agree with the loaders' registries.
    assert set(TEXT_DATASETS) == set(TEXT_SOURCES)
    assert set(ASCII_TEXT_DATASETS) == {n for n, src in TEXT_SOURCES.items() if src.ascii}
    names = typing.get_args(typing.get_type_hints(DataConfig)["name"])
    assert set(names) == set(TEXT_DATASETS) | set(dataset_names())

    lm = ["model.name=transformer", "model.d_model=16", "model.heads=2", "model.layers=1"]
    for extra, classes in ((["data.name=shakespeare"], 128),
                           (["data.name=wikitext2", "data.tokenizer=byte"], 256),
                           (["data.name=wikitext103", "data.tokenizer=word",
                             "data.vocab_size=1000"], 1000)):
        model = build_model_for(load_config(None, [*lm, *extra]))
        assert model.blocks[-1].out_shape[-1] == classes, extra
    for extra, match in (
            (["data.name=wikitext103"], r"data.tokenizer: 'char' covers ASCII.*byte, word"),
            (["data.name=wikitext103", "data.tokenizer=word"], r"data.vocab_size: .* >= 3"),
            (["data.name=wikitext2", "data.tokenizer=word", "data.vocab_size=2"],
             r"data.vocab_size: .* >= 3"),
            (["data.name=wikitext2", "data.tokenizer=byte", "data.vocab_size=300"],
             r"data.vocab_size: the byte tokenizer has a fixed vocabulary of 256"),
            (["data.name=wikitext2", "data.tokenizer=bpe"],
             r"data.tokenizer: 'bpe' is not allowed; allowed values: char, byte, word")):
        with pytest.raises(ConfigError, match=match):
            load_config(None, [*lm, *extra])
    with pytest.raises(ConfigError, match="data.tokenizer: applies to the text datasets"):
        load_config(None, ["data.name=cifar10", "data.tokenizer=word", "data.vocab_size=10"])


def test_a_short_wikitext_run_reports_perplexity(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from grape_dist.trainer import Trainer

    sentences = [" the cat sat on the mat . \n", " the dog sat on the cat . \n",
                 " a bird ran , the dog ran . \n", " Senjō no Valkyria ran . \n"]
    rows = []
    for i in range(80):
        if i % 10 == 0:
            rows += ["", f" = Section {i // 10} = \n", ""]
        rows.append(sentences[(i * 7) % 4])
    write_wikitext(tmp_path / "data", train=rows, valid=rows[:20])
    monkeypatch.setenv("GRAPE_CACHE_DIR", str(tmp_path / "cache"))
    cfg = load_config(None, [
        "rule=grape", "model.name=transformer", "model.d_model=16", "model.layers=2",
        "model.heads=2", "model.feedback=micro", "data.name=wikitext103",
        f"data.root={tmp_path / 'data'}", "data.tokenizer=word", "data.vocab_size=12",
        "data.seq_len=8", "data.batch_size=16", "train.epochs=2", "train.progress=false",
        "optim.lr=3e-3", "calibration.every_epochs=1", "calibration.batch_size=8"])
    out = tmp_path / "run"
    summary = Trainer(cfg, out).fit()
    saved = json.loads((out / "summary.json").read_text())
    rows_out = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    test = [r for r in rows_out if r["split"] == "test"]
    assert saved["dataset"] == "wikitext103" and len(test) == 2
    assert saved["final_test_perplexity"] == pytest.approx(summary["final_test_perplexity"])
    assert saved["final_test_perplexity"] == pytest.approx(math.exp(test[-1]["loss"]))
    # Below the 12-way uniform guess after two epochs on a tiny repetitive corpus.
    assert 1.0 < saved["final_test_perplexity"] < 12
    assert list((tmp_path / "cache").glob("wikitext103-word12-*.pt"))
