"""Raw image sources: the embedded Fashion-MNIST default, torchvision sets and image folders.

Every source is a map-style dataset yielding ``(PIL.Image, int label)``; the multi-crop
dataset wraps it. A missing dataset is a :class:`DatasetNotFoundError` that says how to get it.
WebDataset shards are not raw sources: :func:`hjepa_core.data.sources.build_source` is the one
front door for both.
"""

from __future__ import annotations

import functools
import gzip
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from hjepa_core.data.images import load_image

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
DATASET_NAMES = ("fashion_mnist", "cifar10", "cifar100", "stl10", "imagefolder")


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where the caller said; the message says how to get them."""


def default_cache_dir() -> Path:
    """Where downloads go when no path is given (``$HJEPA_CACHE`` or ``~/.cache/hjepa``)."""
    return Path(os.environ.get("HJEPA_CACHE", Path.home() / ".cache" / "hjepa"))


class ArrayImageDataset(Dataset):
    """In-memory uint8 images (N, H, W[, C]) with integer labels, yielded as PIL images."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> None:
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels.astype(np.int64)
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]), int(self.labels[index])


@functools.lru_cache(maxsize=8)
def _read_idx(path: Path) -> np.ndarray:
    """Reads an IDX file (the MNIST family's format), gzipped or not; cached per process
    because decompressing the training images takes about a second."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise ValueError(f"{path}: truncated IDX file ({array.size} of {int(np.prod(shape))} values)")
    return array.reshape(shape)


def find_fashion_mnist(data_path: str | Path | None) -> Path | None:
    """Returns the first folder holding Fashion-MNIST's four files, or None."""
    candidates = []
    if data_path:
        root = Path(data_path)
        candidates += [root, root / "fashion_mnist", root / "fashion-mnist",
                       root / "FashionMNIST" / "raw"]
    candidates += [FASHION_MNIST_SYSTEM_DIR, default_cache_dir() / "FashionMNIST" / "raw"]
    names = [n for pair in FASHION_MNIST_FILES.values() for n in pair]
    for folder in candidates:
        if all((folder / n).exists() or (folder / n.removesuffix(".gz")).exists() for n in names):
            return folder
    return None


def _idx_file(folder: Path, name: str) -> Path:
    gz = folder / name
    return gz if gz.exists() else folder / name.removesuffix(".gz")


def download_fashion_mnist() -> Path:
    """Downloads Fashion-MNIST with torchvision into the cache dir; returns the folder of its files.

    Raises:
        DatasetNotFoundError: the download failed (the message says how to install it offline).
    """
    from torchvision.datasets import FashionMNIST

    try:
        for train in (True, False):
            FashionMNIST(str(default_cache_dir()), train=train, download=True)
    except Exception as exc:  # network errors come in many types
        raise DatasetNotFoundError(
            "Fashion-MNIST not found and the download failed "
            f"({type(exc).__name__}: {exc}). Install Debian's package "
            "(`apt-get install dataset-fashion-mnist`, or `make fashion-mnist`) or put the four "
            "*-ubyte.gz files in a folder and pass it as data_path."
        ) from exc
    return default_cache_dir() / "FashionMNIST" / "raw"


def load_fashion_mnist(data_path: str | Path | None, split: str, download: bool = True) -> ArrayImageDataset:
    """Fashion-MNIST (Xiao et al., 2017): Debian's ``dataset-fashion-mnist`` files, a given
    folder, or torchvision's download into the cache dir."""
    folder = find_fashion_mnist(data_path)
    if folder is None and download:
        download_fashion_mnist()
        folder = find_fashion_mnist(data_path)
    if folder is None:
        raise DatasetNotFoundError(
            f"Fashion-MNIST not found (looked in {data_path or '-'}, {FASHION_MNIST_SYSTEM_DIR}, "
            f"{default_cache_dir()}). Install `dataset-fashion-mnist` (apt) or allow the download."
        )
    images_name, labels_name = FASHION_MNIST_FILES[split]
    return ArrayImageDataset(
        _read_idx(_idx_file(folder, images_name)),
        _read_idx(_idx_file(folder, labels_name)),
        FASHION_MNIST_CLASSES,
    )


def _is_image_file(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(path)


class ImageFolderSource(ImageFolder):
    """torchvision's ``ImageFolder`` (``root/<class>/<image>``) with our decoder and clear errors.

    Files are opened at ``__getitem__`` time by :func:`hjepa_core.data.images.load_image`, which
    turns any PIL mode into RGB, refuses decompression bombs and raises
    :class:`~hjepa_core.data.images.BadImageError` naming the file when it cannot be decoded.
    """

    def __init__(self, root: str | Path) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DatasetNotFoundError(f"imagefolder: {root} is not a directory; pass a folder of class sub-folders")
        if not any(p.is_dir() for p in root.iterdir()):
            raise DatasetNotFoundError(f"imagefolder: {root} has no class sub-folders (expected root/<class>/<image>)")
        # allow_empty: an empty class folder is a class without images, not an error
        super().__init__(str(root), loader=load_image, is_valid_file=_is_image_file, allow_empty=True)
        if not self.samples:
            raise DatasetNotFoundError(f"imagefolder: no images with extensions {IMAGE_EXTENSIONS} under {root}")
        self.root = root  # a Path, as the other sources' roots


class TorchvisionSource(Dataset):
    """Adapts a torchvision classification dataset to ``(PIL image, label)`` with ``classes``."""

    def __init__(self, dataset: Dataset, classes: Sequence[str]) -> None:
        self.dataset = dataset
        self.classes = list(classes)

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        image, label = self.dataset[index]
        return image, int(label)


_TORCHVISION_CLASS = {"cifar10": "CIFAR10", "cifar100": "CIFAR100", "stl10": "STL10"}


def _torchvision_source(name: str, data_path: str | Path | None, split: str) -> TorchvisionSource:
    from torchvision import datasets

    if not data_path:
        raise DatasetNotFoundError(f"{name}: pass data_path, the folder holding the dataset")
    root = str(data_path)
    try:
        if name == "cifar10":
            ds = datasets.CIFAR10(root, train=split == "train", download=False)
        elif name == "cifar100":
            ds = datasets.CIFAR100(root, train=split == "train", download=False)
        else:
            ds = datasets.STL10(root, split=split, download=False)
    except RuntimeError as exc:
        raise DatasetNotFoundError(
            f"{name} not found under {root} ({exc}). Download it once with "
            f"torchvision.datasets.{_TORCHVISION_CLASS[name]}(root, download=True) "
            "on a machine with internet, then pass that folder as data_path."
        ) from exc
    return TorchvisionSource(ds, ds.classes)


class SubsetSource(Dataset):
    """A fixed random subset of a source (same subset for the same seed), keeping ``classes``."""

    def __init__(self, dataset: Dataset, max_samples: int, seed: int = 0) -> None:
        import torch

        size = len(dataset)  # type: ignore[arg-type]
        order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
        self.dataset = dataset
        self.indices = sorted(order[: min(max_samples, size)])
        self.classes = list(getattr(dataset, "classes", []))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.dataset[self.indices[index]]


def build_raw_source(
    dataset_name: str, data_path: str | Path | None = None, split: str = "train", max_samples: int | None = None
) -> Dataset:
    """A raw dataset by name (see :func:`hjepa_core.data.sources.build_source` for the arguments),
    cut to a fixed random subset of ``max_samples`` when that is smaller."""
    source = _build_full_source(dataset_name, data_path, split)
    if max_samples is not None and max_samples < len(source):  # type: ignore[arg-type]
        return SubsetSource(source, max_samples)
    return source


def _build_full_source(dataset_name: str, data_path: str | Path | None, split: str) -> Dataset:
    name, _, inline_path = dataset_name.partition(":")
    name = name.lower().replace("-", "_")
    data_path = inline_path or data_path
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if name == "fashion_mnist":
        return load_fashion_mnist(data_path, split)
    if name in ("cifar10", "cifar100", "stl10"):
        return _torchvision_source(name, data_path, split)
    if name == "imagefolder":
        if not data_path:
            raise DatasetNotFoundError("imagefolder: pass data_path (or imagefolder:PATH)")
        root = Path(data_path)
        return ImageFolderSource(root / split if (root / split).is_dir() else root)
    raise ValueError(f"unknown dataset {dataset_name!r}; choose one of {', '.join(DATASET_NAMES)}")
