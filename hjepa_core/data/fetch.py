"""``hjepa data fetch``: put a dataset's raw files in a folder (the one ``data.dvc`` tracks).

Fashion-MNIST is written as its four uncompressed IDX files, each checked against a fixed
sha256. The gzip wrappers differ between sources (Debian re-compresses them), the
decompressed bytes do not, so the folder's DVC hash is the same whichever source was used.
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

from hjepa_core.constants import FETCHABLE_DATASETS
from hjepa_core.data.raw_sources import (
    FASHION_MNIST_FILES,
    DatasetNotFoundError,
    download_fashion_mnist,
    find_fashion_mnist,
)
from hjepa_core.utils import AtomicFile, sha256_file

# sha256 of the decompressed files (computed from Debian's dataset-fashion-mnist 2020 package).
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}


class FetchError(RuntimeError):
    """A fetched file does not match its expected hash."""


def _source_folder(dest: Path, download: bool) -> Path:
    """A folder with Fashion-MNIST's files other than ``dest``: Debian's, the cache, or a download."""
    folder = find_fashion_mnist(None)
    if folder is not None and folder.resolve() != dest.resolve():
        return folder
    if download:
        return download_fashion_mnist()
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
        gz = source / f"{name}.gz"
        digest = hashlib.sha256()
        with AtomicFile(target) as out, (gzip.open(gz, "rb") if gz.exists() else open(source / name, "rb")) as src:
            while block := src.read(1 << 20):
                out.write(block)
                digest.update(block)
            if digest.hexdigest() != FASHION_MNIST_SHA256[name]:  # raising leaves the old file in place
                raise FetchError(f"{source / name}: sha256 {digest.hexdigest()} != expected "
                                 f"{FASHION_MNIST_SHA256[name]}")
        written.append(target)
    return written


def fetch_dataset(name: str, dest: str | Path, download: bool = True) -> list[Path]:
    """Fetches the named dataset's raw files into ``dest`` (only ``fashion_mnist`` so far)."""
    if name != "fashion_mnist":
        raise ValueError(f"cannot fetch {name!r}; fetchable: {', '.join(FETCHABLE_DATASETS)} "
                         "(for other data, put the files in the folder and `dvc add` it)")
    return fetch_fashion_mnist(dest, download)
