"""Writing any image source as WebDataset ``.tar`` shards (:func:`write_shards`, ``hjepa shard``).

Shards are ``{split}-%06d.tar``; each sample is ``<key>.png|jpg`` (the image), ``<key>.cls``
(the integer label as text), ``<key>.json`` (source id, original size/mode/format, label,
class name) and ``<key>.sha256`` (the digest of the other three, which the reader checks:
:mod:`.integrity`). ``manifest.json`` is written last and lists, per split, the sample counts per
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

Crash safety: every file is written under a hidden temporary name (``.NAME.PID-RANDOM.tmp``), fsynced
and renamed. Before a split is written its entry is removed from the manifest and its old
shards are deleted; the entry is put back only once all new shards are in place. So an
interrupted run leaves only whole shards of its own, no shard that looks complete but is
not, and no manifest that vouches for a partial split. Output bytes depend only on the
input and the parameters (fixed tar metadata, ordered parallel map), so re-running is
idempotent and ``workers`` does not change a single byte.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import re
import tarfile
from collections import Counter, deque
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from hjepa_core.constants import DEFAULT_SAMPLES_PER_SHARD, SHARD_IMAGE_FORMATS
from hjepa_core.data.images import BadImageError, decode_image, to_rgb
from hjepa_core.data.raw_sources import build_raw_source
from hjepa_core.data.shards.integrity import CHECKSUM_KEY, sample_digest
from hjepa_core.data.shards.manifest import load_manifest_or_new, save_manifest
from hjepa_core.utils import AtomicFile, fsync_dir, make_dirs

DEFAULT_MAX_SHARD_BYTES = 1 << 30
IMAGE_FORMATS = SHARD_IMAGE_FORMATS
SKIP_REASONS = ("empty", "not_an_image", "corrupt", "too_large", "unreadable")

_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK  # tarfile pads a stream to whole records of 20 blocks
_TAR_MTIME = 0  # fixed tar metadata makes the shard bytes depend only on the samples
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_-]+$")


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
        try:
            image = decode_image(data, source_id)
        except BadImageError as exc:
            return _Skipped(index, source_id, exc.reason, exc.detail)
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
    members = {ext: payload, "cls": str(label).encode(),
               "json": json.dumps(record, sort_keys=True).encode()}
    members[CHECKSUM_KEY] = sample_digest(members).encode()  # the reader checks each sample as it reads it
    return _Encoded(index, label, _tar_members(f"{options.split}_{index:09d}", members), record)


_WORKER_STATE: tuple[Dataset, _EncodeOptions, list[str], Any] | None = None


def _init_worker(source: Dataset | None, options: _EncodeOptions, classes: list[str]) -> None:
    global _WORKER_STATE
    files = _file_samples(source) if source is not None else None
    _WORKER_STATE = (source, options, classes, files) if source is not None else None


def _encode_chunk(indices: Sequence[int]) -> list[_Encoded | _Skipped]:
    source, options, classes, files = _WORKER_STATE  # type: ignore[misc]
    return [_encode_index(source, i, options, classes, files) for i in indices]


class _ShardWriter:
    """One shard being written under a temporary name; :meth:`commit` renames it into place."""

    def __init__(self, out_dir: Path, name: str) -> None:
        self.name = name
        self._file = AtomicFile(out_dir / name)
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
        self._file.commit()
        return {"name": self.name, "num_samples": self.count, "bytes": self.bytes,
                "sha256": self._sha256.hexdigest(), "sample_checksums": True}

    def abort(self) -> None:
        self._file.abort()


def _shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def _clean_split(out_dir: Path, split: str) -> None:
    """Removes this split's shards and leftover temporaries of earlier runs."""
    pattern = re.compile(rf"^{re.escape(split)}-\d{{6}}\.tar$|^\.{re.escape(split)}-\d{{6}}\.tar\.[\w-]+\.tmp$")
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
             order: list[int], chunk_size: int = 64) -> Generator[_Encoded | _Skipped, None, None]:
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
        source: a raw source spec for :func:`~hjepa_core.data.raw_sources.build_raw_source`
            (``fashion_mnist``, ``imagefolder:PATH``, ``cifar10:PATH``, ...) or a dataset of
            ``(PIL image, label)`` (a ``samples`` list of ``(path, label)`` makes it file-backed:
            raw bytes are read and checked here, so bad files are skipped, not fatal).
        out_dir: the shard directory (created); other splits' shards and entries are kept.
        split: split name; also the shard file prefix.
        data_path: passed to ``build_raw_source`` with a spec.
        max_samples: with a spec, write ``build_raw_source``'s fixed random subset of this size.
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
        dataset = build_raw_source(source, data_path, split, max_samples)
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
    make_dirs(out)
    manifest = load_manifest_or_new(out)
    if manifest["splits"].pop(split, None) is not None:
        save_manifest(out, manifest)  # a crash from here on leaves the split unlisted
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
    fsync_dir(out)

    written = sum(s["num_samples"] for s in shards)
    if written + len(skipped) != n_inputs:
        raise RuntimeError(f"internal error: {n_inputs} inputs but {written} written + {len(skipped)} skipped")
    label_name = dict(enumerate(classes))
    manifest = load_manifest_or_new(out)
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
    save_manifest(out, manifest)
    return manifest
