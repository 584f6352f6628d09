"""Datasets for the trainer: image registry and loading into uint8 tensors, text corpora with
offline tokenisers (char, byte, word), deterministic sampling."""

from grape_dist.data.images import (
    DatasetUnavailableError,
    ImageDataset,
    Split,
    load_image_dataset,
    normalize,
)
from grape_dist.data.sampling import epoch_batches, random_batch_indices, subset_indices
from grape_dist.data.sources import DATASETS, DatasetSource, dataset_names, get_source
from grape_dist.data.text import (
    TEXT_SOURCES,
    TOKENIZERS,
    VOCAB,
    TextDataset,
    TextDataUnavailableError,
    Tokenizer,
    WordTokenizer,
    load_text_dataset,
    text_dataset_names,
    tokenizer_vocab_size,
)

__all__ = [
    "DATASETS",
    "DatasetSource",
    "DatasetUnavailableError",
    "ImageDataset",
    "Split",
    "TEXT_SOURCES",
    "TOKENIZERS",
    "TextDataUnavailableError",
    "TextDataset",
    "Tokenizer",
    "VOCAB",
    "WordTokenizer",
    "dataset_names",
    "epoch_batches",
    "get_source",
    "load_image_dataset",
    "load_text_dataset",
    "normalize",
    "random_batch_indices",
    "subset_indices",
    "text_dataset_names",
    "tokenizer_vocab_size",
]
