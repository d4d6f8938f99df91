"""``hjepa data fetch``: put a dataset's raw files in a folder (the one ``data.dvc`` tracks).

Fashion-MNIST is written as its four uncompressed IDX files, each checked against a fixed
sha256. The gzip wrappers differ between sources (Debian re-compresses them), the
decompressed bytes do not, so the folder's DVC hash is the same whichever source was used.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
from pathlib import Path

from hjepa_core.constants import FETCHABLE_DATASETS
from hjepa_core.data.raw_sources import (
    FASHION_MNIST_FILES,
    DatasetNotFoundError,
    default_cache_dir,
    find_fashion_mnist,
)

# sha256 of the decompressed files (computed from Debian's dataset-fashion-mnist 2020 package).
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}


class FetchError(RuntimeError):
    """A fetched file does not match its expected hash."""


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _source_folder(dest: Path, download: bool) -> Path:
    """A folder with Fashion-MNIST's files other than ``dest``: Debian's, the cache, or a download."""
    folder = find_fashion_mnist(None)
    if folder is not None and folder.resolve() != dest.resolve():
        return folder
    if download:
        from torchvision.datasets import FashionMNIST

        try:
            for train in (True, False):
                FashionMNIST(str(default_cache_dir()), train=train, download=True)
        except Exception as exc:  # network errors come in many types
            raise DatasetNotFoundError(
                f"Fashion-MNIST: not installed and the download failed ({type(exc).__name__}: {exc}); "
                "`apt-get install dataset-fashion-mnist` (or `make fashion-mnist`) installs it offline"
            ) from exc
        folder = find_fashion_mnist(None)
        if folder is not None:
            return folder
    raise DatasetNotFoundError("Fashion-MNIST not found; `apt-get install dataset-fashion-mnist` or allow the download")


def fetch_fashion_mnist(dest: str | Path, download: bool = True) -> list[Path]:
    """Writes Fashion-MNIST's four IDX files into ``dest`` and verifies them; returns their paths.

    Files already in ``dest`` with the right hash are kept; anything else is replaced.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    names = [n.removesuffix(".gz") for pair in FASHION_MNIST_FILES.values() for n in pair]
    if all((dest / n).is_file() and sha256_file(dest / n) == FASHION_MNIST_SHA256[n] for n in names):
        return [dest / n for n in names]
    source = _source_folder(dest, download)
    written = []
    for name in names:
        target = dest / name
        tmp = dest / f".{name}.tmp"
        gz = source / f"{name}.gz"
        if gz.exists():
            with gzip.open(gz, "rb") as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
        else:
            shutil.copyfile(source / name, tmp)
        actual = sha256_file(tmp)
        if actual != FASHION_MNIST_SHA256[name]:
            tmp.unlink()
            raise FetchError(f"{source / name}: sha256 {actual} != expected {FASHION_MNIST_SHA256[name]}")
        os.replace(tmp, target)
        written.append(target)
    return written


def fetch_dataset(name: str, dest: str | Path, download: bool = True) -> list[Path]:
    """Fetches the named dataset's raw files into ``dest`` (only ``fashion_mnist`` so far)."""
    if name != "fashion_mnist":
        raise ValueError(f"cannot fetch {name!r}; fetchable: {', '.join(FETCHABLE_DATASETS)} "
                         "(for other data, put the files in the folder and `dvc add` it)")
    return fetch_fashion_mnist(dest, download)
