"""Named sources: the embedded Fashion-MNIST, torchvision sets and image folders."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hjepa_core.data import raw_sources as sources
from hjepa_core.data.images import BadImageError
from hjepa_core.data.sources import (
    DATASET_NAMES,
    ArrayImageDataset,
    DatasetNotFoundError,
    ImageFolderSource,
    build_source,
    load_fashion_mnist,
)


def test_fashion_mnist_train_split(fashion_mnist_train: ArrayImageDataset) -> None:
    assert len(fashion_mnist_train) == 60_000
    assert len(fashion_mnist_train.classes) == 10
    image, label = fashion_mnist_train[0]
    assert isinstance(image, Image.Image)
    assert image.size == (28, 28)
    assert image.mode == "L"
    assert isinstance(label, int) and 0 <= label < 10


def test_build_source_fashion_mnist_test_split(fashion_mnist_train: ArrayImageDataset) -> None:
    test = build_source("Fashion-MNIST", split="test")  # name normalised
    assert len(test) == 10_000
    assert sorted({test[i][1] for i in range(200)}) == list(range(10))


def test_fashion_mnist_from_an_explicit_folder(
    tmp_path: Path, fashion_mnist_train: ArrayImageDataset
) -> None:
    system = sources.find_fashion_mnist(None)
    for name in (n for pair in sources.FASHION_MNIST_FILES.values() for n in pair):
        (tmp_path / name).symlink_to(system / name)
    assert sources.find_fashion_mnist(tmp_path) == tmp_path
    assert len(build_source("fashion_mnist", tmp_path, "test")) == 10_000


def test_fashion_mnist_missing_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sources, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "nowhere")
    monkeypatch.setenv("HJEPA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DatasetNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path / "empty", "train", download=False)


def test_truncated_idx_file_is_reported(tmp_path: Path) -> None:
    header = bytes([0, 0, 8, 3]) + (10).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2
    path = tmp_path / "images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(header + bytes(28 * 28 * 3))
    with pytest.raises(ValueError, match="truncated IDX"):
        sources._read_idx(path)


def test_unknown_dataset_name_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown dataset 'imagenet_1k'") as info:
        build_source("imagenet_1k")
    for name in DATASET_NAMES:
        assert name in str(info.value)


def test_bad_split_is_rejected() -> None:
    with pytest.raises(ValueError, match="split"):
        build_source("fashion_mnist", split="validation")


@pytest.mark.parametrize("name", ["cifar10", "cifar100", "stl10"])
def test_torchvision_sets_need_a_path(tmp_path: Path, name: str) -> None:
    with pytest.raises(DatasetNotFoundError, match="data_path"):
        build_source(name)
    with pytest.raises(DatasetNotFoundError, match=f"{name} not found under"):
        build_source(name, tmp_path / "missing")


def test_image_folder_source(image_folder) -> None:
    root = image_folder(per_class=2, classes=("cat", "dog"))
    source = build_source("imagefolder", root)
    assert isinstance(source, ImageFolderSource)
    assert source.classes == ["cat", "dog"]
    assert len(source) == 4
    labels = [source[i][1] for i in range(4)]
    assert labels == [0, 0, 1, 1]
    assert source[0][0].mode == "RGB"
    inline = build_source(f"imagefolder:{root}")
    assert len(inline) == 4


def test_image_folder_uses_the_split_subfolder(tmp_path: Path, image_folder) -> None:
    split_root = tmp_path / "dataset"
    split_root.mkdir()
    image_folder(per_class=1).rename(split_root / "train")  # dataset/train/<class>/<image>
    source = build_source("imagefolder", split_root, "train")
    assert source.root == split_root / "train"
    assert len(source) == 2


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="pass data_path"):
        build_source("imagefolder")
    with pytest.raises(DatasetNotFoundError, match="is not a directory"):
        build_source("imagefolder", tmp_path / "missing")
    with pytest.raises(DatasetNotFoundError, match="no class sub-folders"):
        build_source("imagefolder", tmp_path)
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "notes.txt").write_text("no images here")
    with pytest.raises(DatasetNotFoundError, match="no images"):
        build_source("imagefolder", tmp_path)


def test_image_folder_bad_file_names_the_file(image_folder) -> None:
    root = image_folder(per_class=1, bad={"dog/broken.jpg": b"not a jpeg"})
    source = ImageFolderSource(root)
    bad = [i for i, (path, _) in enumerate(source.samples) if Path(path).name == "broken.jpg"]
    with pytest.raises(BadImageError, match=r"broken\.jpg"):
        source[bad[0]]


def test_array_dataset_checks_lengths() -> None:
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        ArrayImageDataset(np.zeros((3, 4, 4), np.uint8), np.zeros(2), ["a"])
