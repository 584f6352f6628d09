"""Tests of grape_dist.data on real parquet files read through `datasets` (no mocks).

MNIST and CIFAR-10 come from the offline copies in ../shared/data beside the repository root
(tests skip when that folder is absent); CIFAR-100 and Tiny ImageNet are small files in the hub's
schema that the tests write themselves.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from helpers import encode_image, write_cifar100
from PIL import Image

from grape_dist.data import (
    DATASETS,
    DatasetUnavailableError,
    ImageDataset,
    access,
    dataset_names,
    epoch_batches,
    load_image_dataset,
    normalize,
    random_batch_indices,
    subset_indices,
)
from grape_dist.data.access import DIGEST_INDEX, file_digests
from grape_dist.data.images import EMBEDDED_ROOT
from grape_dist.data.text import load_text_dataset

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHARED_MNIST = SHARED_DATA / "mnist" / "mnist"
SHARED_CIFAR10 = SHARED_DATA / "cifar10" / "plain_text"

needs_shared_mnist = pytest.mark.skipif(
    not (SHARED_MNIST / "train-00000-of-00001.parquet").is_file(),
    reason=f"shared MNIST not found at {SHARED_MNIST}",
)
needs_shared_cifar10 = pytest.mark.skipif(
    not (SHARED_CIFAR10 / "train-00000-of-00001.parquet").is_file(),
    reason=f"shared CIFAR-10 not found at {SHARED_CIFAR10}",
)

HUB_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HTTPS_PROXY", "https_proxy")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The developer's own data/cache settings must not leak into what a test resolves.
    monkeypatch.delenv("GRAPE_DATA_DIR", raising=False)
    monkeypatch.delenv("GRAPE_CACHE_DIR", raising=False)


@pytest.fixture(scope="module")
def mnist_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mnist_cache")


@pytest.fixture(scope="module")
def embedded_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("embedded_cache")


@pytest.fixture(scope="module")
def mnist(mnist_cache: Path) -> ImageDataset:
    if not (SHARED_MNIST / "train-00000-of-00001.parquet").is_file():
        pytest.skip(f"shared MNIST not found at {SHARED_MNIST}")
    return load_image_dataset("mnist", root=str(SHARED_DATA), cache_dir=str(mnist_cache))


def _check_image_dataset(ds: ImageDataset, name: str, n_train: int, n_test: int) -> None:
    src = DATASETS[name]
    assert ds.name == name
    assert ds.input_shape == src.input_shape
    assert ds.num_classes == src.num_classes
    for split, n in ((ds.train, n_train), (ds.test, n_test)):
        assert split.images.shape == (n, *src.input_shape)
        assert split.images.dtype == torch.uint8
        assert split.labels.shape == (n,)
        assert split.labels.dtype == torch.int64
        assert int(split.labels.min()) >= 0
        assert int(split.labels.max()) < src.num_classes


# --------------------------------------------------------------------------------------------
# Registry


def test_registry() -> None:
    assert dataset_names() == ["cifar10", "cifar100", "mnist", "tinyimagenet"]
    assert DATASETS["mnist"].hub_id == "ylecun/mnist"
    assert DATASETS["cifar100"].label_column == "fine_label"
    assert DATASETS["tinyimagenet"].hub_id == "zh-plus/tiny-imagenet"
    # The hub copy has no labelled test split: its `valid` split is the evaluated one.
    assert DATASETS["tinyimagenet"].eval_split == "valid"
    assert {src.eval_split for n, src in DATASETS.items() if n != "tinyimagenet"} == {"test"}
    for src in DATASETS.values():
        assert len(src.mean) == len(src.std) == src.input_shape[0]
    with pytest.raises(KeyError, match="known datasets"):
        load_image_dataset("imagenet-42")


# --------------------------------------------------------------------------------------------
# MNIST from the shared folder and from the embedded copy


@needs_shared_mnist
def test_mnist_shared(mnist: ImageDataset) -> None:
    _check_image_dataset(mnist, "mnist", 60000, 10000)
    assert str(SHARED_MNIST) in mnist.source
    assert torch.equal(torch.unique(mnist.train.labels), torch.arange(10))

    table = pq.read_table(SHARED_MNIST / "train-00000-of-00001.parquet")
    assert int(mnist.train.labels[0]) == table.column("label")[0].as_py()
    # Pixel layout: the first image equals a direct PIL decode of its PNG bytes.
    first = Image.open(io.BytesIO(table.column("image")[0]["bytes"].as_py()))
    expected = torch.frombuffer(bytearray(first.tobytes()), dtype=torch.uint8).view(28, 28)
    assert torch.equal(mnist.train.images[0, 0], expected)

    z = normalize(mnist.train.images[:10000], mnist.mean, mnist.std)
    assert z.dtype == torch.float32 and z.shape == (10000, 1, 28, 28)
    assert abs(float(z.mean())) < 0.05 and abs(float(z.std()) - 1.0) < 0.05


@needs_shared_mnist
def test_mnist_cache_roundtrip(mnist: ImageDataset, mnist_cache: Path) -> None:
    cache_files = list(mnist_cache.glob("mnist-*.pt"))
    assert len(cache_files) == 1
    again = load_image_dataset("mnist", root=str(SHARED_DATA), cache_dir=str(mnist_cache))
    assert "decoded cache" in again.source and "decoded cache" not in mnist.source
    for a, b in ((mnist.train, again.train), (mnist.test, again.test)):
        assert torch.equal(a.images, b.images)
        assert torch.equal(a.labels, b.labels)
    # The shared copy is read-only: the digest index and the locks live in the cache folder.
    assert {p.name for p in SHARED_MNIST.iterdir()} == {
        "train-00000-of-00001.parquet", "test-00000-of-00001.parquet"}
    index = json.loads((mnist_cache / DIGEST_INDEX).read_text())
    assert str((SHARED_MNIST / "train-00000-of-00001.parquet").resolve()) in index


@needs_shared_mnist
def test_mnist_from_env_root(
    mnist: ImageDataset, mnist_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GRAPE_DATA_DIR", str(SHARED_DATA))
    monkeypatch.setenv("GRAPE_CACHE_DIR", str(mnist_cache))
    ds = load_image_dataset("mnist")
    assert "GRAPE_DATA_DIR" in ds.source and str(SHARED_MNIST) in ds.source
    assert torch.equal(ds.train.labels, mnist.train.labels)


def test_mnist_embedded(embedded_cache: Path) -> None:
    ds = load_image_dataset("mnist", cache_dir=str(embedded_cache))
    _check_image_dataset(ds, "mnist", 60000, 10000)
    assert "embedded" in ds.source and str(EMBEDDED_ROOT) in ds.source
    table = pq.read_table(EMBEDDED_ROOT / "mnist" / "mnist" / "test-00000-of-00001.parquet")
    assert ds.test.labels.tolist() == table.column("label").to_pylist()


@needs_shared_mnist
def test_mnist_embedded_matches_shared(mnist: ImageDataset, embedded_cache: Path) -> None:
    ds = load_image_dataset("mnist", cache_dir=str(embedded_cache))
    assert torch.equal(ds.train.images, mnist.train.images)
    assert torch.equal(ds.test.labels, mnist.test.labels)


def test_root_without_dataset_falls_back_to_embedded(
    tmp_path: Path, embedded_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # must never get as far as the hub
    ds = load_image_dataset("mnist", root=str(tmp_path), cache_dir=str(embedded_cache))
    assert "embedded" in ds.source
    assert ds.train.images.shape == (60000, 1, 28, 28)


# --------------------------------------------------------------------------------------------
# CIFAR-10 from the shared folder


@needs_shared_cifar10
def test_cifar10_shared(tmp_path: Path) -> None:
    ds = load_image_dataset("cifar10", root=str(SHARED_DATA), cache_dir=str(tmp_path))
    _check_image_dataset(ds, "cifar10", 50000, 10000)
    table = pq.read_table(SHARED_CIFAR10 / "test-00000-of-00001.parquet", columns=["label"])
    assert ds.test.labels.tolist() == table.column("label").to_pylist()
    # Colour images: the channels must not all be equal.
    assert not torch.equal(ds.train.images[:, 0], ds.train.images[:, 1])


# --------------------------------------------------------------------------------------------
# CIFAR-100 in the hub's schema, written by the test


def test_cifar100_written_parquet(tmp_path: Path) -> None:
    written = write_cifar100(tmp_path / "data")
    ds = load_image_dataset("cifar100", root=str(tmp_path / "data"), cache_dir=str(tmp_path / "c"))
    _check_image_dataset(ds, "cifar100", 40, 24)
    train_pixels, train_fine = written["train"]
    assert torch.equal(ds.train.images, train_pixels.permute(0, 3, 1, 2))
    assert torch.equal(ds.train.labels, train_fine)
    assert torch.equal(ds.test.labels, written["test"][1])


@pytest.fixture
def count_hashing(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The files whose bytes get hashed (a spy on the real function, which still runs)."""
    hashed: list[Path] = []
    real = access.sha256_file

    def spy(path: Path) -> str:
        hashed.append(path)
        return real(path)

    monkeypatch.setattr(access, "sha256_file", spy)
    return hashed


def test_cache_is_keyed_by_content_not_path(tmp_path: Path, count_hashing: list[Path]) -> None:
    written = write_cifar100(tmp_path / "orig")
    # Two clones of the same files: one keeps the mtimes (copy2), one gets new ones.
    shutil.copytree(tmp_path / "orig", tmp_path / "a")
    shutil.copytree(tmp_path / "orig", tmp_path / "b", copy_function=shutil.copyfile)
    files_b = sorted(p.name for p in (tmp_path / "b" / "cifar100" / "cifar100").iterdir())
    cache = tmp_path / "cache"

    first = load_image_dataset("cifar100", root=str(tmp_path / "a"), cache_dir=str(cache))
    assert "decoded cache" not in first.source and len(count_hashing) == 2
    (cache_file,) = cache.glob("*.pt")
    mtime = cache_file.stat().st_mtime_ns
    # The same path again: the digest index answers, nothing is read twice.
    load_image_dataset("cifar100", root=str(tmp_path / "a"), cache_dir=str(cache))
    assert len(count_hashing) == 2

    second = load_image_dataset("cifar100", root=str(tmp_path / "b"), cache_dir=str(cache))
    assert len(count_hashing) == 4  # new paths are hashed once...
    assert f"decoded cache {cache_file}" in second.source  # ...and hit the same cache file
    assert list(cache.glob("*.pt")) == [cache_file]
    assert cache_file.stat().st_mtime_ns == mtime  # not rewritten
    assert torch.equal(second.train.images, written["train"][0].permute(0, 3, 1, 2))
    assert torch.equal(second.test.labels, first.test.labels)
    # Nothing was written beside the data.
    assert sorted(p.name for p in (tmp_path / "b" / "cifar100" / "cifar100").iterdir()) == files_b


def _corrupt(cache_file: Path, how: str, other: Path | None = None) -> None:
    if how == "truncated":
        data = cache_file.read_bytes()
        cache_file.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        cache_file.write_bytes(os.urandom(cache_file.stat().st_size))
    elif how == "other_source":  # a valid cache file, but of other data
        assert other is not None
        shutil.copyfile(other, cache_file)
    else:  # a valid torch file whose tensors were altered, its checksum left as it was
        payload = torch.load(cache_file, weights_only=True)
        name = {"wrong_shape": "train_images", "altered_pixels": "train_images",
                "altered_ids": "ids_train"}[how]
        if how == "wrong_shape":
            payload[name] = payload[name][:, :, :16].contiguous()
        else:
            payload[name][0] ^= 1
        torch.save(payload, cache_file)


@pytest.mark.parametrize(
    "how", ["truncated", "garbage", "wrong_shape", "altered_pixels", "other_source"])
def test_corrupt_cache_is_detected_and_rebuilt(tmp_path: Path, how: str) -> None:
    written = write_cifar100(tmp_path / "data")
    root, cache = str(tmp_path / "data"), tmp_path / "cache"
    first = load_image_dataset("cifar100", root=root, cache_dir=str(cache))
    (cache_file,) = cache.glob("cifar100-*.pt")
    other = None
    if how == "other_source":
        write_cifar100(tmp_path / "small", n_train=8, n_test=4)
        load_image_dataset("cifar100", root=str(tmp_path / "small"), cache_dir=str(tmp_path / "c2"))
        (other,) = (tmp_path / "c2").glob("cifar100-*.pt")
    _corrupt(cache_file, how, other)

    with pytest.warns(RuntimeWarning, match="corrupt or mismatched cache file") as record:
        second = load_image_dataset("cifar100", root=root, cache_dir=str(cache))
    assert str(cache_file) in str(record[0].message)
    assert record[0].filename == __file__  # points at the caller
    assert "decoded cache" not in second.source  # decoded afresh...
    third = load_image_dataset("cifar100", root=root, cache_dir=str(cache))
    assert "decoded cache" in third.source  # ...and the cache rewritten
    for ds in (second, third):
        assert torch.equal(ds.train.images, first.train.images)
        assert torch.equal(ds.train.images, written["train"][0].permute(0, 3, 1, 2))
        assert torch.equal(ds.test.images, first.test.images)
        assert torch.equal(ds.test.labels, first.test.labels)
    assert list(cache.glob("cifar100-*.pt")) == [cache_file]


def test_file_digest_index_rehashes_changed_files(
    tmp_path: Path, count_hashing: list[Path]
) -> None:
    f, cache = tmp_path / "data" / "x.parquet", tmp_path / "cache"
    f.parent.mkdir()
    f.write_bytes(b"a" * 1000)
    assert file_digests([f], cache) == {f: hashlib.sha256(b"a" * 1000).hexdigest()}
    assert (cache / DIGEST_INDEX).is_file() and not (f.parent / DIGEST_INDEX).exists()
    file_digests([f], cache)
    assert count_hashing == [f]  # unchanged: from the index
    # Same size, and the mtime put back: still noticed (ctime), so hashed again.
    st = f.stat()
    f.write_bytes(b"b" * 1000)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (f.stat().st_size, f.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert file_digests([f], cache) == {f: hashlib.sha256(b"b" * 1000).hexdigest()}
    # A damaged index, or none at all (unwritable folder), only costs hashing again.
    (cache / DIGEST_INDEX).write_text("{not json")
    assert file_digests([f], cache) == {f: hashlib.sha256(b"b" * 1000).hexdigest()}
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache folder should be")
    assert file_digests([f], blocker / "cache") == {f: hashlib.sha256(b"b" * 1000).hexdigest()}
    assert len(count_hashing) == 4


def test_changed_source_file_misses_cache(tmp_path: Path) -> None:
    write_cifar100(tmp_path / "data")
    root, cache = str(tmp_path / "data"), str(tmp_path / "cache")
    load_image_dataset("cifar100", root=root, cache_dir=cache)
    write_cifar100(tmp_path / "data2", n_train=8, n_test=4)
    target = tmp_path / "data" / "cifar100" / "cifar100"
    for f in (tmp_path / "data2" / "cifar100" / "cifar100").iterdir():
        f.replace(target / f.name)
    ds = load_image_dataset("cifar100", root=root, cache_dir=cache)
    assert "decoded cache" not in ds.source
    assert len(ds.train) == 8 and len(ds.test) == 4


def test_unwritable_cache_dir_still_loads(tmp_path: Path) -> None:
    write_cifar100(tmp_path / "data")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the cache folder should be")
    with pytest.warns(RuntimeWarning, match="not caching"):
        ds = load_image_dataset(
            "cifar100", root=str(tmp_path / "data"), cache_dir=str(blocker / "cache")
        )
    assert len(ds.train) == 40


def test_shape_mismatch_is_reported(tmp_path: Path) -> None:
    write_cifar100(tmp_path / "data", gray=True)
    with pytest.raises(ValueError, match=r"registry says \(3, 32, 32\)"):
        load_image_dataset("cifar100", root=str(tmp_path / "data"), cache_dir=str(tmp_path / "c"))


# --------------------------------------------------------------------------------------------
# The word tokeniser's cache (grape_dist.data.text), on WikiText files in the hub's schema

WIKI_TRAIN = ["", " = Title = \n", "", " the cat sat on the mat . \n", " the dog sat . \n"]
WIKI_VALID = ["", " the bird sat on the cat . \n"]


def write_wikitext103(root: Path) -> Path:
    """<root>/wikitext/wikitext-103-raw-v1/{train,validation}-00000-of-00001.parquet, one
    string column `text`, written by `datasets` as the hub repo Salesforce/wikitext has them."""
    import datasets

    folder = root / "wikitext" / "wikitext-103-raw-v1"
    folder.mkdir(parents=True)
    features = datasets.Features({"text": datasets.Value("string")})
    for split, rows in (("train", WIKI_TRAIN), ("validation", WIKI_VALID)):
        datasets.Dataset.from_dict({"text": rows}, features=features).to_parquet(
            str(folder / f"{split}-00000-of-00001.parquet"))
    return folder


def test_word_cache_is_keyed_by_content_not_path(tmp_path: Path) -> None:
    write_wikitext103(tmp_path / "orig")
    shutil.copytree(tmp_path / "orig", tmp_path / "a", copy_function=shutil.copyfile)
    shutil.copytree(tmp_path / "orig", tmp_path / "b", copy_function=shutil.copyfile)
    cache = tmp_path / "cache"
    first = load_text_dataset("wikitext103", tmp_path / "a", 4, "word", 8, cache_dir=cache)
    (cache_file,) = cache.glob("wikitext103-word8-*.pt")
    mtime = cache_file.stat().st_mtime_ns
    second = load_text_dataset("wikitext103", tmp_path / "b", 4, "word", 8, cache_dir=cache)
    assert "word cache" not in first.source and f"word cache {cache_file}" in second.source
    assert list(cache.glob("*.pt")) == [cache_file] and cache_file.stat().st_mtime_ns == mtime
    assert second.tokenizer.vocab == first.tokenizer.vocab
    assert torch.equal(second.train_x, first.train_x) and torch.equal(second.test_y, first.test_y)


@pytest.mark.parametrize("how", ["truncated", "garbage", "altered_ids", "other_source"])
def test_corrupt_word_cache_is_detected_and_rebuilt(tmp_path: Path, how: str) -> None:
    write_wikitext103(tmp_path / "data")
    cache = tmp_path / "cache"
    first = load_text_dataset("wikitext103", tmp_path / "data", 4, "word", 8, cache_dir=cache)
    (cache_file,) = cache.glob("wikitext103-word8-*.pt")
    other = None
    if how == "other_source":  # the cache of another vocabulary size, renamed over this one
        load_text_dataset("wikitext103", tmp_path / "data", 4, "word", 6, cache_dir=cache)
        (other,) = cache.glob("wikitext103-word6-*.pt")
    _corrupt(cache_file, how, other)

    with pytest.warns(RuntimeWarning, match="corrupt or mismatched cache file") as record:
        second = load_text_dataset("wikitext103", tmp_path / "data", 4, "word", 8,
                                   cache_dir=cache)
    assert str(cache_file) in str(record[0].message) and record[0].filename == __file__
    third = load_text_dataset("wikitext103", tmp_path / "data", 4, "word", 8, cache_dir=cache)
    assert "word cache" not in second.source and "word cache" in third.source
    for ds in (second, third):
        assert ds.tokenizer.vocab == first.tokenizer.vocab
        for name in ("train_x", "train_y", "test_x", "test_y"):
            assert torch.equal(getattr(ds, name), getattr(first, name)), name


# --------------------------------------------------------------------------------------------
# Tiny ImageNet in the hub's schema, written by the test through `datasets`

TINY_WNIDS = [f"n{i:08d}" for i in range(200)]  # stand-ins for the hub's 200 WordNet ids


def write_tiny_imagenet(
    root: Path, n_train: int = 12, n_valid: int = 6
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Write tiny-imagenet/data/{train,valid}-00000-of-00001.parquet as the hub repo
    zh-plus/tiny-imagenet has them: columns image (Image) and label (ClassLabel, 200 names),
    written by `datasets` itself so the files carry its feature metadata.

    Images are 64x64 PNG (lossless); in each split the first image and the middle one are
    grayscale (mode L), as some of the real ones are. Returns per split the RGB pixels (HWC)
    the loader should produce (gray: the value in all three channels) and the labels.
    """
    import datasets

    folder = root / "tiny-imagenet" / "data"
    folder.mkdir(parents=True)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=TINY_WNIDS)}
    )
    gen = torch.Generator().manual_seed(1)
    written = {}
    for split, n in (("train", n_train), ("valid", n_valid)):
        pixels = torch.randint(0, 256, (n, 64, 64, 3), dtype=torch.uint8, generator=gen)
        gray = {0, n // 2}  # the first image: the layout check sees a gray image
        images = []
        for i in range(n):
            if i in gray:
                pixels[i] = pixels[i, :, :, :1].clone()  # the RGB the loader makes of it
                images.append({"bytes": encode_image(pixels[i, :, :, 0], "PNG"), "path": None})
            else:
                images.append({"bytes": encode_image(pixels[i], "PNG"), "path": None})
        labels = torch.randint(0, 200, (n,), generator=gen)
        ds = datasets.Dataset.from_dict(
            {"image": images, "label": labels.tolist()}, features=features
        )
        ds.to_parquet(str(folder / f"{split}-00000-of-00001.parquet"))
        written[split] = (pixels, labels)
    return written


def test_tinyimagenet_written_parquet(tmp_path: Path) -> None:
    written = write_tiny_imagenet(tmp_path / "data")
    folder = tmp_path / "data" / "tiny-imagenet" / "data"
    # The files are in the hub's schema: datasets' feature metadata, a gray first image.
    meta = json.loads(pq.read_schema(folder / "valid-00000-of-00001.parquet")
                      .metadata[b"huggingface"])
    assert meta["info"]["features"]["label"]["_type"] == "ClassLabel"
    assert len(meta["info"]["features"]["label"]["names"]) == 200
    blob = pq.read_table(folder / "train-00000-of-00001.parquet").column("image")[0]["bytes"]
    assert Image.open(io.BytesIO(blob.as_py())).mode == "L"

    ds = load_image_dataset("tinyimagenet", root=str(tmp_path / "data"),
                            cache_dir=str(tmp_path / "c"))
    _check_image_dataset(ds, "tinyimagenet", 12, 6)
    assert ds.eval_split == "valid" and str(folder) in ds.source
    for split, (pixels, labels) in ((ds.train, written["train"]), (ds.test, written["valid"])):
        # Gray images became RGB with equal channels; colour ones kept their pixels.
        assert torch.equal(split.images, pixels.permute(0, 3, 1, 2))
        assert torch.equal(split.labels, labels)
    assert torch.equal(ds.train.images[0, 0], ds.train.images[0, 2])
    assert not torch.equal(ds.train.images[1, 0], ds.train.images[1, 2])
    # Read back from the decoded cache: the same tensors.
    again = load_image_dataset("tinyimagenet", root=str(tmp_path / "data"),
                               cache_dir=str(tmp_path / "c"))
    assert "decoded cache" in again.source
    assert torch.equal(again.test.images, ds.test.images)


def test_tinyimagenet_without_valid_split_is_reported(tmp_path: Path) -> None:
    write_tiny_imagenet(tmp_path / "data")
    (tmp_path / "data" / "tiny-imagenet" / "data" / "valid-00000-of-00001.parquet").unlink()
    with pytest.raises(DatasetUnavailableError, match=r"no valid-\*\.parquet files"):
        load_image_dataset("tinyimagenet", root=str(tmp_path / "data"),
                           cache_dir=str(tmp_path / "c"))


def test_tinyimagenet_offline_names_hub_id_and_layout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DatasetUnavailableError) as err:
        load_image_dataset("tinyimagenet", root=str(tmp_path), cache_dir=str(tmp_path / "c"))
    message = str(err.value)
    assert "zh-plus/tiny-imagenet" in message
    assert str(tmp_path / "tiny-imagenet" / "data") in message
    assert "tiny-imagenet/data/train-*.parquet" in message
    assert "tiny-imagenet/data/valid-*.parquet" in message


def test_tinyimagenet_resnet_trains_end_to_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from grape_dist.config import load_config
    from grape_dist.trainer import Trainer, build_model_for

    write_tiny_imagenet(tmp_path / "data", n_train=32, n_valid=16)
    monkeypatch.setenv("GRAPE_CACHE_DIR", str(tmp_path / "cache"))
    cfg = load_config(None, [
        "rule=grape", "model.name=resnet", "model.depth=8", "data.name=tinyimagenet",
        f"data.root={tmp_path / 'data'}", "data.batch_size=16", "data.eval_batch_size=16",
        "train.epochs=1", "train.progress=false", "train.probe_batch_size=8",
        "feedback.conv=channel", "calibration.every_epochs=1", "calibration.batch_size=8",
    ])
    assert build_model_for(cfg).blocks[-1].out_shape == (200,)
    out = tmp_path / "run"
    summary = Trainer(cfg, out).fit()
    assert summary["dataset"] == "tinyimagenet"
    assert 0.0 <= summary["final_test_accuracy"] <= 1.0
    rows = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    test = [r for r in rows if r["split"] == "test"]
    assert len(test) == 1 and test[0]["loss"] == pytest.approx(summary["final_test_loss"])
    assert json.loads((out / "summary.json").read_text())["dataset"] == "tinyimagenet"


# --------------------------------------------------------------------------------------------
# No local copy and no hub


def test_offline_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "data").mkdir()  # a data folder without this dataset
    monkeypatch.setenv("GRAPE_DATA_DIR", str(tmp_path / "data"))
    start = time.monotonic()
    with pytest.raises(DatasetUnavailableError) as err:
        load_image_dataset("cifar100", cache_dir=str(tmp_path / "cache"))
    assert time.monotonic() - start < 5.0
    message = str(err.value)
    assert "GRAPE_DATA_DIR" in message
    assert str(tmp_path / "data" / "cifar100" / "cifar100") in message
    assert "cifar100/cifar100/train-*.parquet" in message


def test_unreachable_hub_fails_fast(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    for var in HUB_ENV:
        monkeypatch.delenv(var, raising=False)
    # Nothing listens on the discard port locally: the probe is refused at once.
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(DatasetUnavailableError, match="GRAPE_DATA_DIR"):
        load_image_dataset("cifar100", root=str(tmp_path), cache_dir=str(tmp_path / "cache"))
    assert time.monotonic() - start < 5.0


# --------------------------------------------------------------------------------------------
# Sampling


def test_epoch_batches_deterministic_and_complete() -> None:
    a = epoch_batches(1003, 64, seed=7, epoch=3)
    b = epoch_batches(1003, 64, seed=7, epoch=3)
    assert len(a) == 16 and len(a[-1]) == 1003 - 15 * 64
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert all(x.dtype == torch.int64 for x in a)
    order = torch.cat(a)
    assert torch.equal(torch.sort(order).values, torch.arange(1003))
    assert not torch.equal(order, torch.cat(epoch_batches(1003, 64, seed=7, epoch=4)))
    assert not torch.equal(order, torch.cat(epoch_batches(1003, 64, seed=8, epoch=3)))
    assert not torch.equal(order, torch.arange(1003))


def test_epoch_batches_ignores_global_rng() -> None:
    torch.manual_seed(1)
    a = torch.cat(epoch_batches(500, 50, seed=0, epoch=0))
    torch.manual_seed(2)
    torch.rand(10)
    assert torch.equal(a, torch.cat(epoch_batches(500, 50, seed=0, epoch=0)))


def test_epoch_batches_options() -> None:
    plain = epoch_batches(10, 4, seed=0, epoch=0, shuffle=False)
    assert [x.tolist() for x in plain] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    dropped = epoch_batches(10, 4, seed=0, epoch=0, drop_last=True)
    assert [len(x) for x in dropped] == [4, 4]
    assert epoch_batches(0, 4, seed=0, epoch=0) == []
    with pytest.raises(ValueError):
        epoch_batches(10, 0, seed=0, epoch=0)


def test_subset_and_random_batches() -> None:
    s = subset_indices(60000, 500, seed=3)
    assert torch.equal(s, subset_indices(60000, 500, seed=3))
    assert not torch.equal(s, subset_indices(60000, 500, seed=4))
    assert len(torch.unique(s)) == 500 and int(s.min()) >= 0 and int(s.max()) < 60000
    assert torch.equal(subset_indices(10, 50, seed=0), torch.arange(10))

    r = random_batch_indices(1000, 32, seed=1, key=5)
    assert torch.equal(r, random_batch_indices(1000, 32, seed=1, key=5))
    assert not torch.equal(r, random_batch_indices(1000, 32, seed=1, key=6))
    assert len(torch.unique(r)) == 32 and int(r.max()) < 1000
    with pytest.raises(ValueError):
        random_batch_indices(10, 11, seed=0, key=0)


@pytest.mark.parametrize("how", ["root", "env"])
def test_a_named_data_folder_that_does_not_exist_is_refused(how, tmp_path, monkeypatch):
    """MNIST has an embedded copy, but a data folder the user named and mistyped must not
    silently fall back to it (nor to the hub): the error names the setting."""
    missing = tmp_path / "no_such_data"
    monkeypatch.delenv("GRAPE_DATA_DIR", raising=False)
    kwargs = {"cache_dir": str(tmp_path / "cache")}
    if how == "root":
        kwargs["root"] = str(missing)
        name = f"data.root={missing}"
    else:
        monkeypatch.setenv("GRAPE_DATA_DIR", str(missing))
        name = f"GRAPE_DATA_DIR={missing}"
    with pytest.raises(DatasetUnavailableError, match=f"{name}: no such folder"):
        load_image_dataset("mnist", **kwargs)
    from grape_dist.data import load_text_dataset
    with pytest.raises(DatasetUnavailableError, match="no such folder"):
        load_text_dataset("shakespeare", kwargs.get("root"), 64, "char", 0)



def test_a_rank_holds_compact_splits_and_placeholders_that_index_like_them():
    """data/held.py: token windows as int32 still sharing one sequence, placeholders with the
    split's rows and no bytes, and uint8 images normalised on use exactly as before."""
    from grape_dist.data.held import InputPreparer, Tensors, compact, held_by_rank

    ids = torch.arange(1000, 1097)
    x, y = ids[:96].view(12, 8), ids[1:97].view(12, 8)
    c = compact(Tensors(x, y))
    assert c.x.dtype == c.y.dtype == torch.int32
    assert torch.equal(c.x.long(), x) and torch.equal(c.y.long(), y)
    assert c.nbytes == 97 * 4  # one int32 sequence, not two int64 copies (2 x 768 bytes)
    rows = torch.tensor([5, 0, 11])
    sub = compact(Tensors(x[rows], y[rows]))  # a subset: two copies
    assert torch.equal(sub.y.long(), y[rows]) and sub.nbytes == 2 * 3 * 8 * 4
    images = torch.randint(0, 256, (6, 3, 4, 4), dtype=torch.uint8)
    labels = torch.arange(6)
    none = held_by_rank(Tensors(images, labels), inputs=False, labels=False)
    assert none.nbytes == 0 and len(none.x[rows[:2]]) == len(none.y[rows[:2]]) == 2
    prep = InputPreparer(torch.device("cpu"), (0.5, 0.25, 0.125), (0.2, 0.3, 0.4))
    want = (images.float() / 255 - torch.tensor([0.5, 0.25, 0.125]).view(3, 1, 1)) \
        / torch.tensor([0.2, 0.3, 0.4]).view(3, 1, 1)
    torch.testing.assert_close(prep(images), want)
    assert prep(none.x[rows]).shape == (3, 0)  # a placeholder passes through
    assert prep(c.x[:2]).dtype == torch.int64  # tokens widen for the embedding
