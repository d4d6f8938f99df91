"""WebDataset shards: writing any image source to ``.tar`` shards, and streaming them back.

Writing (:func:`write_shards`, ``hjepa shard``)
    Shards are ``{split}-%06d.tar``; each sample is ``<key>.png|jpg`` (the image), ``<key>.cls``
    (the integer label as text) and ``<key>.json`` (source id, original size/mode/format, label,
    class name). ``manifest.json`` is written last and lists, per split, the sample counts per
    class, the class names, every shard's sample count, byte size and sha256, the skipped
    inputs with their reasons, the source and the parameters.

    Samples are written in a seeded random order (``shuffle``; keys keep the source index), so
    shards of class-sorted sources are class-mixed and a reader's shuffle buffer suffices.

    Storage policy: an image file whose format already is the requested one (PNG for ``png``,
    JPEG for ``jpeg``) and whose mode is ``RGB`` or ``L`` is stored byte for byte (no JPEG
    generation loss, no wasted CPU). Anything else is decoded, converted with
    :func:`~hjepa_core.data.images.to_rgb` when its mode is not ``RGB``/``L`` (CMYK, 16-bit,
    palette/alpha: converted in meaning, transparency composited on white) and encoded in the
    requested format. Zero-byte files, non-images, corrupt or truncated data and images over
    :data:`~hjepa_core.data.images.MAX_IMAGE_PIXELS` are skipped, counted and listed; the
    writer checks ``inputs == written + skipped``.

    Crash safety: every file is written under a hidden temporary name (``.NAME.PID.tmp``), fsynced
    and renamed. Before a split is written its entry is removed from the manifest and its old
    shards are deleted; the entry is put back only once all new shards are in place. So an
    interrupted run leaves only whole shards of its own, no shard that looks complete but is
    not, and no manifest that vouches for a partial split. Output bytes depend only on the
    input and the parameters (fixed tar metadata, ordered parallel map), so re-running is
    idempotent and ``workers`` does not change a single byte.

Reading
    :class:`ShardMultiCropDataset` (pretraining) yields
    :class:`~hjepa_core.data.multicrop_dataset.MultiCropSample` objects, so
    :class:`~hjepa_core.data.multicrop_dataset.MultiCropCollator` and
    :func:`~hjepa_core.data.multicrop_dataset.build_multicrop_dataloader` work unchanged;
    :class:`ShardSource` (evaluation) yields ``(PIL image, label)``. Shards are given as a
    directory holding ``manifest.json``, a manifest path/URL, a ``.tar`` path, a brace pattern
    (``dir/train-{000000..000011}.tar``), a ``::``-joined list or any URL: ``pipe:``, ``http(s)``
    and local paths open through WebDataset's ``gopen``, every other scheme (``s3://``,
    ``gs://``, ``memory://``, ...) through fsspec.

    Training (``resampled=True``): each (rank, worker) draws shards with replacement from all
    shards and stops after a fixed number of samples (``with_epoch``), so every DDP rank yields
    the same number of batches however unevenly the shards would split; a handful of shards
    (even one) serves any number of ranks and workers. Evaluation (``resampled=False``): shards
    are split by rank, then by worker, so every sample comes exactly once across ranks x workers;
    when there are fewer shards than ranks (or than a rank's workers) the split falls back to
    sample level (every slot reads the shards and keeps every k-th sample), never an idle
    worker or a silent hang. ``verify=True`` checks each shard's sha256 against the manifest.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import multiprocessing
import os
import re
import sys
import tarfile
import warnings
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlparse

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, IterableDataset

from hjepa_core.data.images import MAX_IMAGE_PIXELS, BadImageError, load_image, to_rgb
from hjepa_core.data.multicrop_dataset import MultiCropSample, sample_seed
from hjepa_core.data.multicrop_transforms import MultiCropTransform, build_multicrop_transform
from hjepa_core.data.sources import build_source

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "hjepa-webdataset-shards"
MANIFEST_VERSION = 1
DEFAULT_SAMPLES_PER_SHARD = 5000
DEFAULT_MAX_SHARD_BYTES = 1 << 30
IMAGE_FORMATS = {"png": ("PNG", "png"), "jpeg": ("JPEG", "jpg")}
IMAGE_KEYS = ("png", "jpg", "jpeg", "webp", "ppm", "pgm", "bmp", "tif", "tiff", "gif")
SKIP_REASONS = ("empty", "not_an_image", "corrupt", "too_large", "unreadable")
SHARD_PREFIXES = ("shards", "webdataset", "wds")

_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK  # tarfile pads a stream to whole records of 20 blocks
_TAR_MTIME = 0  # fixed tar metadata makes the shard bytes depend only on the samples
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")
_BRACE_RE = re.compile(r"\{[^{}]*(\.\.|,)[^{}]*\}")
_SEED_MODULUS = 2**63 - 1


class ShardIntegrityError(RuntimeError):
    """A shard whose bytes do not match the manifest's sha256 (or that cannot be checked)."""


# --------------------------------------------------------------------------------------------
# Shard specs and URLs
# --------------------------------------------------------------------------------------------


def _local_path(url: str) -> Path | None:
    """The local path of ``url`` (plain path or ``file://``), or None for remote URLs."""
    if url.startswith("pipe:"):
        return None
    scheme = _SCHEME_RE.match(url)
    if scheme is None:
        return Path(url)
    if scheme.group(1) == "file":
        return Path(urlparse(url).path)
    return None


def is_shard_spec(spec: str | os.PathLike | None) -> bool:
    """Whether ``spec`` names WebDataset shards rather than a raw dataset.

    True for ``pipe:`` commands and ``scheme://`` URLs, ``.tar``/``.tgz`` paths, brace patterns,
    ``::``-joined lists, ``manifest.json`` paths and directories holding ``manifest.json``.
    """
    if spec is None:
        return False
    text = str(spec)
    if not text:
        return False
    if "::" in text:
        return any(is_shard_spec(part) for part in text.split("::"))
    if text.startswith("pipe:") or _SCHEME_RE.match(text):
        return True
    if text.endswith((".tar", ".tar.gz", ".tgz", MANIFEST_NAME)) or _BRACE_RE.search(text):
        return True
    local = Path(text)
    return local.is_dir() and (local / MANIFEST_NAME).is_file()


def shard_spec_from(dataset_name: str | None, data_path: str | os.PathLike | None = None) -> str | None:
    """The shard spec a ``(dataset_name, data_path)`` pair refers to, or None for raw datasets.

    ``shards:SPEC`` / ``webdataset:SPEC`` (or ``dataset_name="shards"`` with ``data_path``), a
    ``dataset_name`` that is itself a shard spec, or a ``data_path`` that is one.
    """
    name = dataset_name or ""
    prefix, sep, rest = name.partition(":")
    if prefix.lower() in SHARD_PREFIXES and not rest.startswith("//"):
        spec = rest if sep and rest else (str(data_path) if data_path else "")
        if not spec:
            raise ValueError(f"{name!r}: say where the shards are ({prefix}:DIR or data_path=DIR)")
        return spec
    if is_shard_spec(name):
        return name
    if data_path is not None and is_shard_spec(data_path):
        return str(data_path)
    return None


def open_url(url: str) -> BinaryIO:
    """Opens a shard or manifest for reading.

    Local paths, ``file://``, ``pipe:`` and the other schemes WebDataset's ``gopen`` knows
    (http, https, sftp, ...) go through ``gopen``; every other scheme (s3, gs, az, memory, ...)
    through fsspec, which needs that filesystem's package (``s3fs``, ``gcsfs``, ...).
    """
    from webdataset.gopen import gopen, gopen_schemes

    if url.startswith("pipe:") or _local_path(url) is not None:
        return gopen(url, "rb")
    scheme = _SCHEME_RE.match(url).group(1)  # type: ignore[union-attr]
    if scheme in gopen_schemes and scheme != "gs":
        return gopen(url, "rb")
    import fsspec

    try:
        return fsspec.open(url, "rb").open()
    except ImportError as exc:
        raise ImportError(f"{url}: fsspec needs a package for {scheme}:// ({exc})") from exc


def read_manifest(location: str | os.PathLike) -> dict:
    """Reads ``manifest.json`` from a shard directory, a manifest path or a manifest URL."""
    text = str(location)
    local = _local_path(text)
    if local is not None and local.is_dir():
        text = str(local / MANIFEST_NAME)
    try:
        with open_url(text) as stream:
            manifest = json.load(stream)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"{text}: no shard manifest (write one with `hjepa shard --out DIR`)"
        ) from exc
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{text}: not an hjepa shard manifest (format={manifest.get('format')!r})")
    return manifest


def _join(base: str, name: str) -> str:
    local = _local_path(base)
    if local is not None and not base.startswith("file://"):
        return str(local / name)
    return base.rstrip("/") + "/" + name


def _dirname(url: str) -> str:
    local = _local_path(url)
    if local is not None and not url.startswith("file://"):
        return str(local.parent)
    return url.rsplit("/", 1)[0]


@dataclass
class ShardList:
    """Resolved shard URLs of one split, with the manifest when one was found."""

    urls: list[str]
    split: str
    manifest: dict | None = None

    @property
    def split_info(self) -> dict | None:
        if self.manifest is None:
            return None
        return self.manifest.get("splits", {}).get(self.split)

    @property
    def classes(self) -> list[str]:
        info = self.split_info
        if info is not None:
            return list(info.get("classes", []))
        return list((self.manifest or {}).get("classes", []))

    def shard_info(self, url: str) -> dict | None:
        """The manifest's record of a shard (by file name, in this split first), or None."""
        if self.manifest is None:
            return None
        name = url.rsplit("/", 1)[-1]
        splits = self.manifest.get("splits", {})
        for info in sorted(splits.values(), key=lambda i: i is not self.split_info):
            found = next((s for s in info["shards"] if s["name"] == name), None)
            if found is not None:
                return found
        return None

    def shard_counts(self) -> list[int] | None:
        """Samples per shard in ``urls`` order, or None when the manifest does not say."""
        counts = [self.shard_info(u) for u in self.urls]
        if any(c is None for c in counts):
            return None
        return [int(c["num_samples"]) for c in counts]  # type: ignore[index]

    @property
    def num_samples(self) -> int | None:
        counts = self.shard_counts()
        return sum(counts) if counts is not None else None


def _urls_from_manifest(manifest: dict, base: str, split: str, where: str) -> list[str]:
    splits = manifest.get("splits", {})
    if split not in splits:
        raise ValueError(
            f"{where}: split {split!r} is not in the manifest (has {sorted(splits) or 'none'}); "
            f"an interrupted `hjepa shard --split {split}` leaves it out: re-run it"
        )
    return [_join(base, s["name"]) for s in splits[split]["shards"]]


def resolve_shards(
    spec: str | os.PathLike | Sequence[str] | ShardList,
    split: str = "train",
    manifest: str | os.PathLike | dict | None = None,
) -> ShardList:
    """Expands a shard spec into URLs and finds its manifest.

    Args:
        spec: a directory with ``manifest.json``, a manifest path/URL, a path, brace pattern,
            ``::``-joined list or URL of ``.tar`` shards, or a list of those; an optional
            ``shards:`` prefix is stripped.
        split: the split to read from a manifest.
        manifest: a manifest (dict, path or URL) for URLs whose manifest cannot be found next to
            them (remote shards); local shards look for ``manifest.json`` in their folder.

    Raises:
        FileNotFoundError: a local shard or directory that does not exist.
        ValueError: an empty spec or a split missing from the manifest.
    """
    from webdataset.shardlists import expand_urls

    if isinstance(spec, ShardList):
        return spec
    loaded = read_manifest(manifest) if isinstance(manifest, (str, os.PathLike)) else manifest
    if isinstance(spec, (str, os.PathLike)):
        text = str(spec)
        prefix, sep, rest = text.partition(":")
        if sep and prefix.lower() in SHARD_PREFIXES and not rest.startswith("//"):
            text = rest
        local = _local_path(text)
        if local is not None and local.is_dir():
            if (local / MANIFEST_NAME).is_file():
                loaded = read_manifest(local)
                urls = _urls_from_manifest(loaded, str(local), split, text)
            else:
                urls = sorted(str(p) for p in local.glob(f"{split}-*.tar"))
                if not urls:
                    raise FileNotFoundError(f"{text}: no {MANIFEST_NAME} and no {split}-*.tar shards")
        elif text.endswith(MANIFEST_NAME):
            loaded = read_manifest(text)
            urls = _urls_from_manifest(loaded, _dirname(text), split, text)
        else:
            urls = expand_urls(text)
    else:
        urls = [str(u) for u in spec]
    if not urls:
        raise ValueError(f"{spec!r}: no shards")
    for url in urls:
        local = _local_path(url)
        if local is not None and not local.is_file():
            raise FileNotFoundError(f"shard {url} does not exist")
    first = _local_path(urls[0])
    if loaded is None and first is not None and (first.parent / MANIFEST_NAME).is_file():
        loaded = read_manifest(first.parent)
    return ShardList(urls, split, loaded)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _EncodeOptions:
    image_format: str
    quality: int
    split: str
    source_name: str


@dataclass
class _Encoded:
    """One sample ready for the tar: its serialised tar members and its metadata."""

    index: int
    label: int
    members: bytes
    record: dict


@dataclass
class _Skipped:
    index: int
    source_id: str
    reason: str
    detail: str


def _tar_members(key: str, files: dict[str, bytes]) -> bytes:
    """Serialises ``key.ext`` files as POSIX ustar members (header + data padded to 512 bytes).

    Done in the encoding workers so the writer only concatenates; fixed metadata (mtime 0,
    mode 0444, owner ``hjepa``) makes the bytes depend on the content alone.
    """
    parts = []
    for ext in sorted(files):
        data = files[ext]
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(data)
        info.mtime = _TAR_MTIME
        info.mode = 0o444
        info.uname = info.gname = "hjepa"
        parts.append(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict"))
        parts.append(data)
        parts.append(bytes(-len(data) % _TAR_BLOCK))
    return b"".join(parts)


def _tar_file_size(member_bytes: int) -> int:
    """Final size of a tar stream whose members take ``member_bytes``."""
    return -(-(member_bytes + 2 * _TAR_BLOCK) // _TAR_RECORD) * _TAR_RECORD


def _encode_pil(image: Image.Image, raw: bytes | None, options: _EncodeOptions) -> tuple[bytes, str, bool, bool]:
    """Returns ``(bytes, extension, converted, reencoded)`` for a decoded image."""
    pil_format, ext = IMAGE_FORMATS[options.image_format]
    keeps_mode = image.mode in ("RGB", "L")
    if raw is not None and keeps_mode and image.format == pil_format:
        return raw, ext, False, False
    out = image if keeps_mode else to_rgb(image)
    buffer = io.BytesIO()
    if pil_format == "JPEG":
        out.save(buffer, "JPEG", quality=options.quality)
    else:
        out.save(buffer, "PNG")
    return buffer.getvalue(), ext, not keeps_mode, True


def _decode_raw(data: bytes) -> tuple[Image.Image | None, str, str]:
    """Decodes untrusted file bytes; returns ``(image, "", "")`` or ``(None, reason, detail)``."""
    if not data:
        return None, "empty", "zero-byte file"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                return None, "too_large", f"{width}x{height} is over {MAX_IMAGE_PIXELS} pixels"
            image.load()
    except Image.DecompressionBombError as exc:
        return None, "too_large", str(exc)
    except UnidentifiedImageError:
        return None, "not_an_image", "not a recognised image format"
    except Exception as exc:  # malformed input makes PIL's plugins raise many types
        return None, "corrupt", f"{type(exc).__name__}: {exc}"
    return image, "", ""


def _record(source_id: str, image: Image.Image, label: int, classes: Sequence[str],
            converted: bool, reencoded: bool) -> dict:
    return {
        "source_id": source_id,
        "original_size": list(image.size),
        "original_mode": image.mode,
        "original_format": image.format,
        "label": label,
        "class": classes[label] if 0 <= label < len(classes) else str(label),
        "converted": converted,
        "stored": "reencoded" if reencoded else "original",
    }


def _file_samples(source: Dataset) -> tuple[list[tuple[Path, int]], Path | None] | None:
    """``((path, label) pairs, root)`` of a file-backed source (ImageFolder-like, or a
    ``SubsetSource`` of one), else None."""
    inner, indices = getattr(source, "dataset", None), getattr(source, "indices", None)
    if inner is not None and indices is not None:
        found = _file_samples(inner)
        return ([found[0][i] for i in indices], found[1]) if found is not None else None
    samples = getattr(source, "samples", None)
    if not isinstance(samples, list) or not samples:
        return None
    first = samples[0]
    if isinstance(first, tuple) and len(first) == 2 and isinstance(first[0], (str, Path)):
        root = getattr(source, "root", None)
        return samples, Path(root) if root is not None else None
    return None


def _original_index(source: Dataset, index: int) -> int:
    indices = getattr(source, "indices", None)
    return int(indices[index]) if indices is not None and getattr(source, "dataset", None) is not None else index


def _encode_index(source: Dataset, index: int, options: _EncodeOptions, classes: Sequence[str],
                  files: tuple[list[tuple[Path, int]], Path | None] | None) -> _Encoded | _Skipped:
    if files is not None:
        path, label = files[0][index]
        root = files[1]
        try:
            source_id = Path(path).relative_to(root).as_posix() if root else str(path)
        except ValueError:
            source_id = str(path)
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            return _Skipped(index, source_id, "unreadable", f"{type(exc).__name__}: {exc}")
        image, reason, detail = _decode_raw(data)
        if image is None:
            return _Skipped(index, source_id, reason, detail)
    else:
        data = None
        source_id = f"{options.source_name}:{options.split}:{_original_index(source, index)}"
        try:
            image, label = source[index]
        except BadImageError as exc:
            return _Skipped(index, source_id, "corrupt", str(exc))
    label = int(label)
    payload, ext, converted, reencoded = _encode_pil(image, data, options)
    record = _record(source_id, image, label, classes, converted, reencoded)
    files = {ext: payload, "cls": str(label).encode(),
             "json": json.dumps(record, sort_keys=True).encode()}
    return _Encoded(index, label, _tar_members(f"{options.split}_{index:09d}", files), record)


_WORKER_STATE: tuple[Dataset, _EncodeOptions, list[str], Any] | None = None


def _init_worker(source: Dataset | None, options: _EncodeOptions, classes: list[str]) -> None:
    global _WORKER_STATE
    files = _file_samples(source) if source is not None else None
    _WORKER_STATE = (source, options, classes, files) if source is not None else None


def _encode_chunk(indices: Sequence[int]) -> list[_Encoded | _Skipped]:
    source, options, classes, files = _WORKER_STATE  # type: ignore[misc]
    return [_encode_index(source, i, options, classes, files) for i in indices]


def _temp_name(name: str) -> str:
    return f".{name}.{os.getpid()}.tmp"


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    """Writes ``data`` to a temporary name, fsyncs it and renames it over ``path``."""
    temp = path.with_name(_temp_name(path.name))
    try:
        with open(temp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


class _ShardWriter:
    """One shard being written under a temporary name; :meth:`commit` renames it into place."""

    def __init__(self, out_dir: Path, name: str) -> None:
        self.name = name
        self.final = out_dir / name
        self.temp = out_dir / _temp_name(name)
        self._file = open(self.temp, "wb")  # noqa: SIM115 -- closed by commit() or abort()
        self._sha256 = hashlib.sha256()
        self.count = 0
        self.bytes = 0

    def fits(self, members: bytes, max_bytes: int | None) -> bool:
        return max_bytes is None or _tar_file_size(self.bytes + len(members)) <= max_bytes

    def write(self, members: bytes) -> None:
        self._file.write(members)
        self._sha256.update(members)
        self.count += 1
        self.bytes += len(members)

    def commit(self) -> dict:
        """Ends the archive (two zero blocks, padded to a whole record), fsyncs and renames."""
        self.write(bytes(_tar_file_size(self.bytes) - self.bytes))
        self.count -= 1
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self.temp, self.final)
        return {"name": self.name, "num_samples": self.count,
                "bytes": self.bytes, "sha256": self._sha256.hexdigest()}

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
        self.temp.unlink(missing_ok=True)


def _load_manifest_or_new(out_dir: Path) -> dict:
    path = out_dir / MANIFEST_NAME
    if path.is_file():
        try:
            manifest = json.loads(path.read_text())
            if manifest.get("format") == MANIFEST_FORMAT:
                return manifest
        except (OSError, ValueError):
            pass
    return {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "classes": [], "splits": {}}


def _save_manifest(out_dir: Path, manifest: dict) -> None:
    _write_atomic(out_dir / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())


def _shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def _clean_split(out_dir: Path, split: str) -> None:
    """Removes this split's shards and leftover temporaries of earlier runs."""
    pattern = re.compile(rf"^{re.escape(split)}-\d{{6}}\.tar$|^\.{re.escape(split)}-\d{{6}}\.tar\.\d+\.tmp$")
    for path in out_dir.iterdir():
        if pattern.match(path.name):
            path.unlink(missing_ok=True)


def shuffled_order(count: int, seed: int) -> list[int]:
    """A seeded permutation of ``range(count)`` that no library upgrade can change: indices
    sorted by a SplitMix64 hash of ``(index, seed)`` (plain uint64 arithmetic)."""
    mask = (1 << 64) - 1
    z = np.arange(count, dtype=np.uint64) ^ np.uint64((seed * 0x9E3779B97F4A7C15) & mask)
    z = z + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return np.argsort(z, kind="stable").tolist()


def _results(source: Dataset, options: _EncodeOptions, classes: list[str], workers: int,
             order: list[int], chunk_size: int = 64) -> Iterator[_Encoded | _Skipped]:
    """Encoded samples in ``order``, computed by ``workers`` processes.

    At most ``4 x workers`` chunks are in flight, so a slow disk cannot make encoded samples
    pile up in memory.
    """
    n = len(order)
    chunks = (order[s:s + chunk_size] for s in range(0, n, chunk_size))
    if workers <= 1 or n <= chunk_size:
        _init_worker(source, options, classes)
        try:
            for chunk in chunks:
                yield from _encode_chunk(chunk)
        finally:
            _init_worker(None, options, classes)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with context.Pool(workers, initializer=_init_worker, initargs=(source, options, classes)) as pool:
        pending = deque(pool.apply_async(_encode_chunk, (c,)) for c in islice(chunks, 4 * workers))
        while pending:
            results = pending.popleft().get()
            following = next(chunks, None)
            if following is not None:
                pending.append(pool.apply_async(_encode_chunk, (following,)))
            yield from results


def write_shards(
    source: str | Dataset,
    out_dir: str | os.PathLike,
    split: str = "train",
    *,
    data_path: str | None = None,
    max_samples: int | None = None,
    samples_per_shard: int | None = None,
    max_shard_bytes: int | None = None,
    image_format: str = "png",
    quality: int = 95,
    workers: int = 1,
    shuffle: bool = True,
    seed: int = 0,
    progress: bool = True,
    source_name: str | None = None,
) -> dict:
    """Writes one split of an image source as WebDataset shards and updates the manifest.

    Args:
        source: a source spec for :func:`~hjepa_core.data.sources.build_source`
            (``fashion_mnist``, ``imagefolder:PATH``, ``cifar10:PATH``, ...) or a dataset of
            ``(PIL image, label)`` (a ``samples`` list of ``(path, label)`` makes it file-backed:
            raw bytes are read and checked here, so bad files are skipped, not fatal).
        out_dir: the shard directory (created); other splits' shards and entries are kept.
        split: split name; also the shard file prefix.
        data_path: passed to ``build_source`` with a spec.
        max_samples: with a spec, write ``build_source``'s fixed random subset of this size.
        samples_per_shard: samples per shard at most.
        max_shard_bytes: bytes per shard file at most (a single larger sample gets its own shard).
            With neither limit given, 5000 samples and 1 GiB apply.
        image_format: ``png`` (lossless) or ``jpeg``.
        quality: JPEG quality (1-100) when re-encoding to JPEG.
        workers: encoding processes (0: all CPUs); the output is the same for any value.
        shuffle: write the samples in a seeded random order (class-sorted sources such as
            image folders would otherwise give single-class shards, which a reader's shuffle
            buffer cannot mix); keys keep each sample's source index.
        seed: the order's seed.
        progress: show a progress bar.
        source_name: name recorded in the manifest (defaults to the spec or the class name).

    Returns:
        The whole manifest (all splits); ``manifest["splits"][split]`` describes this run.

    Raises:
        ValueError: invalid parameters; ``DatasetNotFoundError`` for a missing dataset.
    """
    if not _SPLIT_RE.match(split):
        raise ValueError(f"split {split!r} must be letters, digits, '_' or '-'")
    if image_format not in IMAGE_FORMATS:
        raise ValueError(f"image_format must be one of {sorted(IMAGE_FORMATS)}, got {image_format!r}")
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    if samples_per_shard is not None and samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if max_shard_bytes is not None and max_shard_bytes < _TAR_RECORD:
        raise ValueError(f"max_shard_bytes must be >= {_TAR_RECORD} (one tar record), got {max_shard_bytes}")
    if workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if samples_per_shard is None and max_shard_bytes is None:
        samples_per_shard, max_shard_bytes = DEFAULT_SAMPLES_PER_SHARD, DEFAULT_MAX_SHARD_BYTES
    workers = workers or os.cpu_count() or 1
    if isinstance(source, str):
        name = source_name or source
        dataset = build_source(source, data_path, split, max_samples)
    else:
        name = source_name or type(source).__name__
        dataset = source
    classes = [str(c) for c in getattr(dataset, "classes", [])]
    options = _EncodeOptions(image_format, quality, split, name)
    params = {"split": split, "data_path": data_path, "max_samples": max_samples,
              "samples_per_shard": samples_per_shard,
              "max_shard_bytes": max_shard_bytes, "image_format": image_format,
              "quality": quality, "workers": workers, "shuffle": shuffle, "seed": seed}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = _load_manifest_or_new(out)
    if manifest["splits"].pop(split, None) is not None:
        _save_manifest(out, manifest)  # a crash from here on leaves the split unlisted
    _clean_split(out, split)  # no old shard may pass for part of this run

    from tqdm import tqdm

    n_inputs = len(dataset)  # type: ignore[arg-type]
    shards: list[dict] = []
    skipped: list[_Skipped] = []
    class_counts: Counter[int] = Counter()
    converted = reencoded = 0
    writer: _ShardWriter | None = None
    order = shuffled_order(n_inputs, seed) if shuffle else list(range(n_inputs))
    results = _results(dataset, options, classes, workers, order)
    try:
        with tqdm(total=n_inputs, desc=f"shard {split}", unit="img", disable=not progress,
                  dynamic_ncols=True) as bar:
            for item in results:
                bar.update(1)
                if isinstance(item, _Skipped):
                    skipped.append(item)
                    bar.set_postfix(skipped=len(skipped), refresh=False)
                    continue
                if writer is not None and (
                    (samples_per_shard is not None and writer.count >= samples_per_shard)
                    or not writer.fits(item.members, max_shard_bytes)
                ):
                    shards.append(writer.commit())
                    writer = None
                if writer is None:
                    writer = _ShardWriter(out, _shard_name(split, len(shards)))
                writer.write(item.members)
                class_counts[item.label] += 1
                converted += item.record["converted"]
                reencoded += item.record["stored"] == "reencoded"
            if writer is not None:
                shards.append(writer.commit())
                writer = None
    finally:
        if writer is not None:
            writer.abort()
        results.close()
    _fsync_dir(out)

    written = sum(s["num_samples"] for s in shards)
    if written + len(skipped) != n_inputs:
        raise RuntimeError(f"internal error: {n_inputs} inputs but {written} written + {len(skipped)} skipped")
    label_name = dict(enumerate(classes))
    manifest = _load_manifest_or_new(out)
    manifest["classes"] = classes
    manifest["splits"][split] = {
        "source": name,
        "params": params,
        "classes": classes,
        "num_inputs": n_inputs,
        "num_samples": written,
        "num_skipped": len(skipped),
        "num_converted": converted,
        "num_reencoded": reencoded,
        "class_counts": {label_name.get(k, str(k)): v for k, v in sorted(class_counts.items())},
        "skipped_by_reason": dict(sorted(Counter(s.reason for s in skipped).items())),
        "skipped": [{"source_id": s.source_id, "reason": s.reason, "detail": s.detail} for s in skipped],
        "pattern": (_shard_name(split, 0) if len(shards) == 1 else
                    f"{split}-{{000000..{len(shards) - 1:06d}}}.tar") if shards else None,
        "shards": shards,
    }
    manifest["splits"] = dict(sorted(manifest["splits"].items()))
    _save_manifest(out, manifest)
    return manifest


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _mix(*values: int) -> int:
    """A deterministic 63-bit seed from integers."""
    mixed = 0
    for v in values:
        mixed = (mixed * 1_000_003 + int(v) + 0x9E3779B9) % _SEED_MODULUS
    return mixed


def _take_every(items: Iterable, start: int, step: int) -> Iterator:
    return islice(items, start, None, step) if step > 1 else iter(items)


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Explicit values, else ``torch.distributed``, else the ``RANK``/``WORLD_SIZE`` env vars."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        else:
            rank = int(os.environ.get("RANK", 0))
            world_size = int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world_size {world_size}")
    return rank, world_size


def _worker() -> tuple[int, int]:
    info = torch.utils.data.get_worker_info()
    return (info.id, info.num_workers) if info is not None else (0, 1)


def _share(total: int, part: int, parts: int) -> int:
    """Size of ``part`` when ``total`` items are dealt round-robin over ``parts``."""
    return total // parts + (part < total % parts)


@dataclass
class _Plan:
    """How one (rank, worker) slot reads: which shards, and which samples of them."""

    urls: list[str]
    sample_start: int = 0
    sample_step: int = 1
    notes: list[str] = field(default_factory=list)


_STREAM_OPTIONS = ("manifest", "epoch_samples", "shuffle_buffer", "seed", "verify",
                   "skip_bad_images", "rank", "world_size")


class _ShardStream(IterableDataset):
    """Common part of the shard readers: shard selection, opening, verification, decoding."""

    def __init__(
        self,
        shards: str | os.PathLike | Sequence[str] | ShardList,
        split: str = "train",
        *,
        manifest: str | os.PathLike | dict | None = None,
        resampled: bool = False,
        epoch_samples: int | None = None,
        shuffle_buffer: int = 1000,
        seed: int = 0,
        verify: bool = False,
        skip_bad_images: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__()
        self.shards = resolve_shards(shards, split, manifest)
        self.split = split
        self.resampled = resampled
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.verify = verify
        self.skip_bad_images = skip_bad_images
        self.rank = rank
        self.world_size = world_size
        self.num_skipped = 0
        # epoch, epoch_was_set, skip_batches, batch_size: in shared memory so that set_epoch()
        # and skip_batches() reach persistent DataLoader workers too.
        self._state = torch.zeros(4, dtype=torch.int64).share_memory_()
        if verify:
            missing = [u for u in self.shards.urls if not (self.shards.shard_info(u) or {}).get("sha256")]
            if missing:
                raise ShardIntegrityError(
                    f"verify=True but the manifest has no sha256 for {missing[0]} "
                    f"({len(missing)} shard(s)); pass manifest= or verify=False"
                )
        if resampled and epoch_samples is None:
            total = self.shards.num_samples
            if total is None:
                raise ValueError(
                    "resampled shards need an epoch length: the manifest does not give the sample "
                    "count, so pass epoch_samples (samples per rank per epoch)"
                )
            epoch_samples = total // _rank_world(rank, world_size)[1]
        if epoch_samples is not None and epoch_samples < 1:
            raise ValueError(f"epoch_samples must be >= 1, got {epoch_samples}")
        self.epoch_samples = epoch_samples

    @property
    def classes(self) -> list[str]:
        return self.shards.classes

    @property
    def epoch(self) -> int:
        return int(self._state[0])

    def set_epoch(self, epoch: int) -> None:
        """Seeds shard resampling, shuffling and augmentation from ``epoch`` (and clears a skip).

        Until it is first called, every iteration draws fresh OS randomness (never a repeated
        epoch); from then on a stream is reproducible for a given seed, epoch and worker count.
        """
        self._state[0], self._state[1], self._state[2] = epoch, 1, 0

    def skip_batches(self, count: int, batch_size: int) -> None:
        """The next iterations of this epoch start at loader batch ``count`` (exact mid-epoch
        resume; training mode only).

        Worker shares differ by at most one sample, earlier workers first, so the DataLoader's
        round robin puts loader batch ``q`` on worker ``q % W``. On resume, worker ``p`` plays
        the stream of worker ``(p + count) % W`` and drops, undecoded, that stream's first
        ``batch_size x`` (its batches before ``count``): the remaining batches come out
        identical and in the same order.
        """
        if not self.resampled:
            raise ValueError("skip_batches needs resampled=True (the training stream)")
        if count < 0 or batch_size < 1:
            raise ValueError(f"need count >= 0 and batch_size >= 1, got {count}, {batch_size}")
        self._state[2], self._state[3] = count, batch_size

    def _resume_role(self, worker: int, workers: int) -> tuple[int, int]:
        """``(stream this worker plays, samples it drops)`` honouring :meth:`skip_batches`."""
        count, batch = int(self._state[2]), int(self._state[3])
        if count == 0 or not self.resampled:
            return worker, 0
        role = (worker + count) % workers
        size = _share(int(self.epoch_samples), role, workers)  # type: ignore[arg-type]
        return role, min(_share(count, role, workers) * batch, size)

    def _stream_seed(self, rank: int, worker: int) -> int:
        if int(self._state[1]):
            return _mix(self.seed, self.epoch, rank, worker)
        return int.from_bytes(os.urandom(8), "little") % _SEED_MODULUS

    def __len__(self) -> int:
        """Samples this rank yields per epoch (summed over its workers)."""
        if self.resampled:
            return int(self.epoch_samples)  # type: ignore[arg-type]
        rank, world = _rank_world(self.rank, self.world_size)
        counts = self.shards.shard_counts()
        if counts is None:
            raise TypeError("no manifest with per-shard counts: the length is unknown")
        if len(counts) >= world:
            return sum(counts[rank::world])
        return _share(sum(counts), rank, world)

    def _plan(self, rank: int, world: int, worker: int, workers: int) -> _Plan:
        """Exactly-once split of the shards (evaluation) over ranks, then workers."""
        urls = list(self.shards.urls)
        plan = _Plan(urls)
        if len(urls) >= world:
            plan.urls = urls[rank::world]
        else:
            plan.sample_start, plan.sample_step = rank, world
            plan.notes.append(f"{len(urls)} shard(s) < {world} ranks")
        if len(plan.urls) >= workers:
            plan.urls = plan.urls[worker::workers]
        elif workers > 1:
            plan.sample_start += plan.sample_step * worker
            plan.sample_step *= workers
            plan.notes.append(f"{len(plan.urls)} shard(s) < {workers} workers")
        return plan

    def _open(self, urls: Iterable[dict]) -> Iterator[dict]:
        """Opens each shard (verifying it when asked) and yields its raw tar members."""
        from webdataset.tariterators import tar_file_expander

        for item in urls:
            url = item["url"]
            with open_url(url) as stream:
                if self.verify:
                    data = stream.read()
                    expected = (self.shards.shard_info(url) or {}).get("sha256")
                    actual = hashlib.sha256(data).hexdigest()
                    if actual != expected:
                        raise ShardIntegrityError(
                            f"{url}: sha256 {actual} does not match the manifest's {expected}; "
                            "the shard is damaged or from another run: re-run `hjepa shard`"
                        )
                    yield from tar_file_expander([{"url": url, "stream": io.BytesIO(data)}])
                else:
                    yield from tar_file_expander([{"url": url, "stream": stream}])

    def _raw_samples(self, stream_seed: int, role: int | None = None) -> Iterator[dict]:
        """WebDataset sample dicts for this (rank, worker) and epoch; ``role`` replaces the
        worker id in training mode (see :meth:`skip_batches`)."""
        import webdataset as wds
        from webdataset.shardlists import ResampledShards, SimpleShardList
        from webdataset.tariterators import group_by_keys

        rank, world = _rank_world(self.rank, self.world_size)
        worker, workers = _worker()
        if self.resampled:
            worker = worker if role is None else role
            shard_source = ResampledShards(self.shards.urls, seed=stream_seed, deterministic=True,
                                           worker_seed=lambda: 0)
            stages: list[Any] = [shard_source, self._open, group_by_keys]
            mine = _share(int(self.epoch_samples), worker, workers)  # type: ignore[arg-type]
            if mine == 0:
                return iter(())
            # What the buffer holds when the epoch ends is read for nothing: keep it <= 5%.
            buffer = min(self.shuffle_buffer, mine // 20)
            if buffer > 1:
                import random

                rng = random.Random(stream_seed)
                stages.append(wds.shuffle(buffer, min(buffer, 100), rng=rng))
            return iter(wds.DataPipeline(*stages).with_epoch(mine))  # with_epoch: fixed length
        plan = self._plan(rank, world, worker, workers)
        if plan.notes and worker == 0 and rank == 0:
            warnings.warn(
                f"{'; '.join(plan.notes)}: every slot reads the shards and keeps every "
                f"{plan.sample_step}-th sample (correct, but more I/O; write more shards)",
                stacklevel=3,
            )
        if not plan.urls:
            return iter(())
        node = [SimpleShardList(plan.urls), self._open, group_by_keys]
        pipeline = wds.DataPipeline(*node)
        return _take_every(iter(pipeline), plan.sample_start, plan.sample_step)

    def _decode(self, sample: dict) -> tuple[Image.Image, int, int]:
        """``(RGB image, label, source index)`` of a raw sample; BadImageError if unusable."""
        key = sample["__key__"]
        ext = next((e for e in IMAGE_KEYS if e in sample), None)
        where = f"{sample.get('__url__', '?')}:{key}"
        if ext is None:
            raise BadImageError(f"{where}: no image entry (has {sorted(sample)})")
        image = load_image(sample[ext], name=f"{where}.{ext}")
        label = int(sample["cls"]) if "cls" in sample else -1
        tail = key.rsplit("_", 1)[-1]
        index = int(tail) if tail.isdigit() else -1
        return image, label, index

    def _decoded(self, stream_seed: int = 0, role: int | None = None,
                 skip: int = 0) -> Iterator[tuple[Image.Image, int, int] | None]:
        """Decoded samples (after dropping ``skip`` undecoded); None for an unreadable one when
        ``skip_bad_images``."""
        for sample in islice(self._raw_samples(stream_seed, role), skip, None):
            try:
                yield self._decode(sample)
            except BadImageError:
                if not self.skip_bad_images:
                    raise
                self.num_skipped += 1
                yield None


class ShardSource(_ShardStream):
    """Streams ``(PIL RGB image, label)`` from shards, each sample exactly once across ranks
    and DataLoader workers (evaluation, feature extraction). Has ``classes`` and, with a
    manifest, ``len()`` (this rank's share). Unreadable samples are skipped and counted in
    ``num_skipped`` (per process).

    Args:
        shards: see :func:`resolve_shards`.
        split: the manifest split.
        manifest, verify, rank, world_size, skip_bad_images: see :class:`ShardMultiCropDataset`.
    """

    def __init__(
        self,
        shards: str | os.PathLike | Sequence[str] | ShardList,
        split: str = "test",
        *,
        manifest: str | os.PathLike | dict | None = None,
        verify: bool = False,
        skip_bad_images: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__(shards, split, manifest=manifest, verify=verify,
                         skip_bad_images=skip_bad_images, rank=rank, world_size=world_size)

    def __iter__(self) -> Iterator[tuple[Image.Image, int]]:
        for item in self._decoded():
            if item is not None:
                yield item[0], item[1]

    def iter_with_index(self) -> Iterator[tuple[Image.Image, int, int]]:
        """Like iteration, with each sample's index in the source split as a third element."""
        for item in self._decoded():
            if item is not None:
                yield item


class ShardMultiCropDataset(_ShardStream):
    """Streams :class:`MultiCropSample` objects from shards for pretraining.

    With ``resampled`` (training) every rank yields exactly ``epoch_samples`` samples per epoch
    (default: the manifest's count // world size), split over its workers, from shards drawn
    with replacement and a sample shuffle buffer; equal counts mean equal batch counts on every
    DDP rank. Without it, every sample comes exactly once across ranks x workers (validation;
    ranks may then differ by a shard, so no gradient sync on that loop).

    Randomness is keyed: each worker's shard draws and shuffle come from
    ``(seed, epoch, rank, worker)``; each sample's augmentation seed from that stream and its
    position in it (resampled) or from ``(seed, epoch, index)`` otherwise, so batches are
    reproducible for a given seed and worker count. Call :meth:`set_epoch` every epoch (and
    :meth:`skip_batches` to resume mid-epoch).

    Args:
        shards: see :func:`resolve_shards`.
        split: the manifest split.
        transform: the multi-crop transform (built from the remaining ``kwargs`` when None).
        resampled: training mode (above).
        kwargs: the options below; anything else goes to :func:`build_multicrop_transform`.
        manifest: a manifest for shards that have none next to them.
        epoch_samples: samples per rank per epoch in training mode.
        shuffle_buffer: sample shuffle buffer per worker in training mode (<= 1: off), capped
            at 1/20 of the worker's epoch share (what it holds at the epoch's end is wasted).
        seed: base seed.
        verify: check each shard's sha256 against the manifest as it is read.
        skip_bad_images: yield None (dropped and counted by the collator) for unreadable
            samples instead of raising.
        rank, world_size: override ``torch.distributed`` / the ``RANK``/``WORLD_SIZE`` env vars.
    """

    def __init__(
        self,
        shards: str | os.PathLike | Sequence[str] | ShardList,
        split: str = "train",
        transform: MultiCropTransform | None = None,
        *,
        resampled: bool = True,
        **kwargs: Any,
    ) -> None:
        options = {k: kwargs.pop(k) for k in _STREAM_OPTIONS if k in kwargs}
        super().__init__(shards, split, resampled=resampled, **options)
        self.transform = transform or build_multicrop_transform(**kwargs)

    def __iter__(self) -> Iterator[MultiCropSample | None]:
        rank, _ = _rank_world(self.rank, self.world_size)
        role, skip = self._resume_role(*_worker())
        stream = self._stream_seed(rank, role)
        for position, item in enumerate(self._decoded(stream, role, skip), start=skip):
            if item is None:
                yield None
                continue
            image, label, index = item
            if self.resampled or index < 0:
                seed = sample_seed(stream, 0, position)
            else:
                seed = sample_seed(self.seed, self.epoch, index)
            views = self.transform.sample_views(image, torch.Generator().manual_seed(seed))
            yield MultiCropSample(views.crops, label, views.geometry, views.num_global_crops,
                                  index, seed)


def shard_source(dataset_name: str, data_path: str | os.PathLike | None = None, split: str = "test",
                 max_samples: int | None = None) -> ShardSource:
    """:func:`~hjepa_core.data.sources.build_source`'s entry for shard specs.

    Raises:
        ValueError: with ``max_samples``: a stream has no fixed random subset; write one with
            ``hjepa shard --max-samples N`` (the same subset ``build_source`` would pick).
    """
    if max_samples is not None:
        raise ValueError(
            "max_samples does not apply to shards (a stream has no fixed subset): write the "
            "subset as its own shards with `hjepa shard --max-samples N`"
        )
    return ShardSource(shard_spec_from(dataset_name, data_path), split)  # type: ignore[arg-type]




def build_shard_multicrop_dataset(
    shards: str | os.PathLike | Sequence[str] | ShardList,
    split: str = "train",
    resampled: bool | None = None,
    max_samples: int | None = None,
    **kwargs: Any,
) -> ShardMultiCropDataset:
    """A :class:`ShardMultiCropDataset`; ``resampled`` defaults to ``split == "train"``.

    ``kwargs`` are the dataset's own options (``epoch_samples``, ``seed``, ``verify`` ...) and
    the rest go to :func:`build_multicrop_transform`. ``max_samples`` caps a resampled epoch
    at that many samples over all ranks (the cost of a ``max_samples`` subset, drawn from all
    shards rather than from a fixed subset).
    """
    resampled = split == "train" if resampled is None else resampled
    if max_samples is not None:
        if not resampled:
            raise ValueError("max_samples on shards only caps a resampled (training) epoch; "
                             "write a subset with `hjepa shard --max-samples N` instead")
        listed = resolve_shards(shards, split, kwargs.get("manifest"))
        world = _rank_world(kwargs.get("rank"), kwargs.get("world_size"))[1]
        cap = min(max_samples, listed.num_samples or max_samples)
        kwargs.setdefault("epoch_samples", max(1, cap // world))
        shards = listed
    return ShardMultiCropDataset(shards, split, kwargs.pop("transform", None), resampled=resampled,
                                 **kwargs)


# --------------------------------------------------------------------------------------------
# Command line (registered by hjepa_core.cli as `hjepa shard`)
# --------------------------------------------------------------------------------------------

_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
               "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_byte_size(text: str) -> int:
    """Parses ``500000``, ``64MB``, ``1GiB`` ... into bytes."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 500000, 64MB, 1GiB)")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_shard_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds ``hjepa shard``'s options to ``parser`` and returns it."""
    parser.add_argument("--source", required=True,
                        help="fashion_mnist | imagefolder:PATH | cifar10:PATH | cifar100:PATH | stl10:PATH")
    parser.add_argument("--out", required=True, help="shard directory (manifest.json goes there)")
    parser.add_argument("--split", default="train", help="split to write (default: train)")
    parser.add_argument("--data-path", default=None, help="dataset folder when not in --source")
    parser.add_argument("--max-samples", type=_positive_int, default=None,
                        help="write a fixed random subset of this size (quick runs)")
    limit = parser.add_mutually_exclusive_group()
    limit.add_argument("--samples-per-shard", type=_positive_int, default=None,
                       help=f"samples per shard (default {DEFAULT_SAMPLES_PER_SHARD}, capped at 1 GiB)")
    limit.add_argument("--max-shard-bytes", type=parse_byte_size, default=None,
                       help="bytes per shard file at most, e.g. 256MB")
    parser.add_argument("--image-format", choices=sorted(IMAGE_FORMATS), default="png",
                        help="png (lossless, default) or jpeg; matching files are stored as-is")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality 1-100 (default 95)")
    parser.add_argument("--workers", type=int, default=1,
                        help="encoding processes (0: all CPUs); output is identical for any value")
    parser.add_argument("--no-shuffle", action="store_true",
                        help="keep the source order (default: a seeded random order)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample order")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run_shard(args: argparse.Namespace) -> int:
    """Runs ``hjepa shard``; returns the exit code (0 ok, 1 nothing written, 2 bad input)."""
    from hjepa_core.data.sources import DatasetNotFoundError

    try:
        manifest = write_shards(
            args.source, args.out, args.split, data_path=args.data_path,
            max_samples=args.max_samples,
            samples_per_shard=args.samples_per_shard, max_shard_bytes=args.max_shard_bytes,
            image_format=args.image_format, quality=args.quality, workers=args.workers,
            shuffle=not args.no_shuffle, seed=args.seed, progress=not args.no_progress,
        )
    except (DatasetNotFoundError, ValueError, OSError) as exc:
        print(f"hjepa shard: error: {exc}", file=sys.stderr)
        return 2
    info = manifest["splits"][args.split]
    reasons = ", ".join(f"{k}: {v}" for k, v in info["skipped_by_reason"].items())
    print(
        f"{args.split}: {info['num_inputs']} inputs = {info['num_samples']} written in "
        f"{len(info['shards'])} shard(s) + {info['num_skipped']} skipped"
        + (f" ({reasons})" if reasons else "")
        + f"; {info['num_converted']} converted; manifest: {Path(args.out) / MANIFEST_NAME}"
    )
    if info["num_samples"] == 0:
        print("hjepa shard: error: no readable images", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hjepa_core.data.shards ...``: the same as ``hjepa shard ...``."""
    parser = add_shard_arguments(argparse.ArgumentParser(
        prog="hjepa shard", description="Write an image dataset as WebDataset shards."))
    return run_shard(parser.parse_args(argv))


__all__ = [
    "MANIFEST_NAME",
    "ShardIntegrityError",
    "ShardList",
    "ShardMultiCropDataset",
    "ShardSource",
    "add_shard_arguments",
    "build_shard_multicrop_dataset",
    "is_shard_spec",
    "open_url",
    "parse_byte_size",
    "read_manifest",
    "resolve_shards",
    "run_shard",
    "shard_spec_from",
    "write_shards",
]

if __name__ == "__main__":
    sys.exit(main())
