"""Datasets for the trainer: registry, loading into uint8 tensors, deterministic sampling."""

from grape_dist.data.images import (
    DatasetUnavailableError,
    ImageDataset,
    Split,
    load_image_dataset,
    normalize,
)
from grape_dist.data.sampling import epoch_batches, random_batch_indices, subset_indices
from grape_dist.data.sources import DATASETS, DatasetSource, dataset_names, get_source

__all__ = [
    "DATASETS",
    "DatasetSource",
    "DatasetUnavailableError",
    "ImageDataset",
    "Split",
    "dataset_names",
    "epoch_batches",
    "get_source",
    "load_image_dataset",
    "normalize",
    "random_batch_indices",
    "subset_indices",
]
