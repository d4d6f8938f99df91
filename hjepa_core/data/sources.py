"""Named image sources: one front door (:func:`build_source`) for raw datasets and WebDataset shards.

Raw datasets (Fashion-MNIST, torchvision sets, image folders) live in
:mod:`hjepa_core.data.raw_sources`, shards in :mod:`hjepa_core.data.shards`; their public names
are re-exported here.
"""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from hjepa_core.data.raw_sources import (
    DATASET_NAMES,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_FILES,
    FASHION_MNIST_SYSTEM_DIR,
    IMAGE_EXTENSIONS,
    ArrayImageDataset,
    DatasetNotFoundError,
    ImageFolderSource,
    SubsetSource,
    TorchvisionSource,
    build_raw_source,
    default_cache_dir,
    find_fashion_mnist,
    load_fashion_mnist,
)
from hjepa_core.data.shards import shard_source, shard_spec_from

__all__ = [
    "DATASET_NAMES",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_SYSTEM_DIR",
    "IMAGE_EXTENSIONS",
    "ArrayImageDataset",
    "DatasetNotFoundError",
    "ImageFolderSource",
    "SubsetSource",
    "TorchvisionSource",
    "build_source",
    "default_cache_dir",
    "find_fashion_mnist",
    "load_fashion_mnist",
]


def build_source(
    dataset_name: str, data_path: str | Path | None = None, split: str = "train", max_samples: int | None = None
) -> Dataset:
    """Returns the named dataset as ``(PIL image, label)`` samples with a ``classes`` list.

    Args:
        dataset_name: one of :data:`DATASET_NAMES`; ``imagefolder:PATH`` is accepted too.
        data_path: where the files are (required except for ``fashion_mnist``).
        split: ``train`` or ``test`` (``imagefolder`` uses ``data_path/split`` when it exists).
        max_samples: keep a fixed random subset of this size (quick runs, CPU budgets).

    A shard spec (``shards:DIR``, see :func:`hjepa_core.data.shards.shard_spec_from`) gives an
    iterable :class:`~hjepa_core.data.shards.ShardSource` (each sample once across ranks and
    workers; any split the manifest has).
    """
    if shard_spec_from(dataset_name, data_path) is not None:
        return shard_source(dataset_name, data_path, split, max_samples)
    return build_raw_source(dataset_name, data_path, split, max_samples)
