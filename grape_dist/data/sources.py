"""Registry of the image datasets the trainer knows how to load.

Each entry records where the dataset lives on the Hugging Face hub, the sub-folder that the
hub's parquet export uses (so a local copy laid out like the hub can be found under a data
root), the column names, the split a run evaluates on, and the facts the models and the
normalisation need.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DatasetSource:
    """Where a dataset comes from and what its images look like."""

    name: str
    hub_id: str
    subdir: str  # relative folder holding {train,<eval_split>}-*.parquet, as in the hub's export
    image_column: str
    label_column: str
    num_classes: int
    input_shape: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]  # per channel, on the [0, 1] scale
    std: tuple[float, ...]
    # The hub split a run evaluates on (the trainer's "test" split).
    eval_split: str = "test"
    # Whether some images of a colour set are grayscale: they are converted to RGB, and a
    # grayscale first image is not taken as a sign of the wrong files.
    gray_images: bool = False


DATASETS: dict[str, DatasetSource] = {
    "mnist": DatasetSource(
        name="mnist",
        hub_id="ylecun/mnist",
        subdir="mnist/mnist",
        image_column="image",
        label_column="label",
        num_classes=10,
        input_shape=(1, 28, 28),
        mean=(0.1307,),
        std=(0.3081,),
    ),
    "cifar10": DatasetSource(
        name="cifar10",
        hub_id="uoft-cs/cifar10",
        subdir="cifar10/plain_text",
        image_column="img",
        label_column="label",
        num_classes=10,
        input_shape=(3, 32, 32),
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    ),
    "cifar100": DatasetSource(
        name="cifar100",
        hub_id="uoft-cs/cifar100",
        subdir="cifar100/cifar100",
        image_column="img",
        label_column="fine_label",
        num_classes=100,
        input_shape=(3, 32, 32),
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
    ),
    # The hub copy mirrors Stanford's release: 100,000 labelled training images (500 per class)
    # and the 10,000 labelled validation images as `valid`; the release's test images have no
    # labels and are not on the hub, so `valid` is the evaluated split (as in the literature).
    # Locally: <root>/tiny-imagenet/data/{train,valid}-*.parquet, the repo's own `data/` folder.
    "tinyimagenet": DatasetSource(
        name="tinyimagenet",
        hub_id="zh-plus/tiny-imagenet",
        subdir="tiny-imagenet/data",
        image_column="image",
        label_column="label",
        num_classes=200,
        input_shape=(3, 64, 64),
        # The values commonly quoted for Tiny ImageNet's training set.
        mean=(0.4802, 0.4481, 0.3975),
        std=(0.2302, 0.2265, 0.2262),
        eval_split="valid",
        gray_images=True,  # some images are grayscale (mode L) JPEGs
    ),
}


def dataset_names() -> list[str]:
    """Names accepted by :func:`grape_dist.data.load_image_dataset`, sorted."""
    return sorted(DATASETS)


def get_source(name: str) -> DatasetSource:
    """Look a dataset up by name; unknown names raise ``KeyError`` listing the known ones."""
    try:
        return DATASETS[name]
    except KeyError:
        raise KeyError(
            f"unknown dataset {name!r}; known datasets: {', '.join(dataset_names())}"
        ) from None
