"""Streaming WebDataset shards back: :class:`ShardMultiCropDataset` and :class:`ShardSource`.

:class:`ShardMultiCropDataset` (pretraining) yields
:class:`~hjepa_core.data.samples.MultiCropSample` objects, so
:class:`~hjepa_core.data.multicrop_dataset.MultiCropCollator` and
:func:`~hjepa_core.data.multicrop_dataset.build_multicrop_dataloader` work unchanged;
:class:`ShardSource` (evaluation) yields ``(PIL image, label)``. Shards are given as any spec
:func:`~hjepa_core.data.shards.manifest.resolve_shards` takes (see :mod:`.spec`).

Training (``resampled=True``): each (rank, worker) draws shards with replacement from all
shards and stops after a fixed number of samples (``with_epoch``), so every DDP rank yields
the same number of batches however unevenly the shards would split; a handful of shards
(even one) serves any number of ranks and workers. Evaluation (``resampled=False``): shards
are split by rank, then by worker, so every sample comes exactly once across ranks x workers;
when there are fewer shards than ranks (or than a rank's workers) the split falls back to
sample level (every slot reads the shards and keeps every k-th sample), never an idle
worker or a silent hang. Every shard is checked as it is read (:mod:`.integrity`): a corrupt
sample or the unreadable rest of a shard is skipped, and the loss is recorded in ``integrity``.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import torch
from PIL import Image
from torch.utils.data import IterableDataset

from hjepa_core.data.images import BadImageError, EncodedImage, load_image
from hjepa_core.data.multicrop_transforms import MultiCropTransform, build_multicrop_transform
from hjepa_core.data.samples import MultiCropSample, sample_seed
from hjepa_core.data.shards.integrity import ShardIntegrity, read_shard
from hjepa_core.data.shards.manifest import ShardList, resolve_shards
from hjepa_core.data.shards.spec import open_url, shard_spec_from
from hjepa_core.utils import SEED_MODULUS, mix_seeds, rank_world

IMAGE_KEYS = ("png", "jpg", "jpeg", "webp", "ppm", "pgm", "bmp", "tif", "tiff", "gif")


def _take_every(items: Iterable, start: int, step: int) -> Iterator:
    return islice(items, start, None, step) if step > 1 else iter(items)


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


_STREAM_OPTIONS = ("manifest", "epoch_samples", "shuffle_buffer", "seed", "skip_bad_images", "rank",
                   "world_size")


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
        self.integrity = ShardIntegrity(self.shards.urls, self.shards.shard_counts())
        self._index = {url: i for i, url in enumerate(self.shards.urls)}
        self.skip_bad_images = skip_bad_images
        self.rank = rank
        self.world_size = world_size
        self.num_skipped = 0
        # epoch, epoch_was_set, skip_batches, batch_size: in shared memory so that set_epoch()
        # and skip_batches() reach persistent DataLoader workers too.
        self._state = torch.zeros(4, dtype=torch.int64).share_memory_()
        if resampled and epoch_samples is None:
            total = self.shards.num_samples
            if total is None:
                raise ValueError(
                    "resampled shards need an epoch length: the manifest does not give the sample "
                    "count, so pass epoch_samples (samples per rank per epoch)"
                )
            epoch_samples = total // rank_world(rank, world_size)[1]
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
            return mix_seeds(self.seed, self.epoch, rank, worker, salt=0x9E3779B9)
        return int.from_bytes(os.urandom(8), "little") % SEED_MODULUS

    def __len__(self) -> int:
        """Samples this rank yields per epoch (summed over its workers)."""
        if self.resampled:
            return int(self.epoch_samples)  # type: ignore[arg-type]
        rank, world = rank_world(self.rank, self.world_size)
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
        """The intact raw samples of each shard, checked as they are read (see :mod:`.integrity`)."""
        for item in urls:
            url = item["url"]
            yield from read_shard(url, functools.partial(open_url, url), self._index[url], self.integrity,
                                  self.shards.shard_info(url))

    def _raw_samples(self, stream_seed: int, role: int | None = None) -> Iterator[dict]:
        """WebDataset sample dicts for this (rank, worker) and epoch; ``role`` replaces the
        worker id in training mode (see :meth:`skip_batches`)."""
        import webdataset as wds
        from webdataset.shardlists import ResampledShards, SimpleShardList

        rank, world = rank_world(self.rank, self.world_size)
        worker, workers = _worker()
        if self.resampled:
            worker = worker if role is None else role
            shard_source = ResampledShards(self.shards.urls, seed=stream_seed, deterministic=True,
                                           worker_seed=lambda: 0)
            stages: list[Any] = [shard_source, self._open]
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
        node = [SimpleShardList(plan.urls), self._open]
        pipeline = wds.DataPipeline(*node)
        return _take_every(iter(pipeline), plan.sample_start, plan.sample_step)

    @staticmethod
    def _entry(sample: dict) -> tuple[bytes, str, int, int]:
        """``(image bytes, name, label, source index)`` of a raw sample; BadImageError if it
        has no image."""
        key = sample["__key__"]
        ext = next((e for e in IMAGE_KEYS if e in sample), None)
        where = f"{sample.get('__url__', '?')}:{key}"
        if ext is None:
            raise BadImageError(f"{where}: no image entry (has {sorted(sample)})")
        label = int(sample["cls"]) if "cls" in sample else -1
        tail = key.rsplit("_", 1)[-1]
        index = int(tail) if tail.isdigit() else -1
        return sample[ext], f"{where}.{ext}", label, index

    def _decode(self, sample: dict, stream_seed: int, position: int) -> Any:
        """``(RGB image, label, source index)`` of a raw sample (the ``position``-th of the
        stream ``stream_seed``); BadImageError if unusable."""
        data, name, label, index = self._entry(sample)
        return load_image(data, name=name), label, index

    def _decoded(self, stream_seed: int = 0, role: int | None = None, skip: int = 0) -> Iterator[Any]:
        """:meth:`_decode` of each sample (after dropping ``skip`` undecoded); None for an
        unreadable one when ``skip_bad_images``."""
        samples = islice(self._raw_samples(stream_seed, role), skip, None)
        for position, sample in enumerate(samples, start=skip):
            try:
                yield self._decode(sample, stream_seed, position)
            except BadImageError:
                if not self.skip_bad_images:
                    raise
                self.num_skipped += 1
                yield None


class ShardSource(_ShardStream):
    """Streams ``(PIL RGB image, label)`` from shards, each sample exactly once across ranks
    and DataLoader workers (evaluation, feature extraction). Has ``classes`` and, with a
    manifest, ``len()`` (this rank's share). Unreadable samples are skipped and counted in
    ``num_skipped`` (per process); corrupt shards and samples in ``integrity`` (all processes).

    Args:
        shards: see :func:`resolve_shards`.
        split: the manifest split.
        manifest, rank, world_size, skip_bad_images: see :class:`ShardMultiCropDataset`.
    """

    def __init__(
        self,
        shards: str | os.PathLike | Sequence[str] | ShardList,
        split: str = "test",
        *,
        manifest: str | os.PathLike | dict | None = None,
        skip_bad_images: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        super().__init__(shards, split, manifest=manifest, skip_bad_images=skip_bad_images, rank=rank,
                         world_size=world_size)

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
        rank, _ = rank_world(self.rank, self.world_size)
        role, skip = self._resume_role(*_worker())
        return self._decoded(self._stream_seed(rank, role), role, skip)

    def _decode(self, sample: dict, stream_seed: int, position: int) -> MultiCropSample:
        """The sample's crops, decoded only as large as they need (see
        :meth:`~hjepa_core.data.multicrop_transforms.MultiCropTransform.decode_views`)."""
        data, name, label, index = self._entry(sample)
        if self.resampled or index < 0:
            seed = sample_seed(stream_seed, 0, position)
        else:
            seed = sample_seed(self.seed, self.epoch, index)
        views = self.transform.decode_views(EncodedImage(data, name), torch.Generator().manual_seed(seed))
        return MultiCropSample(views.crops, label, views.geometry, views.num_global_crops, index, seed)


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

    ``kwargs`` are the dataset's own options (``epoch_samples``, ``seed`` ...) and
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
        world = rank_world(kwargs.get("rank"), kwargs.get("world_size"))[1]
        cap = min(max_samples, listed.num_samples or max_samples)
        kwargs.setdefault("epoch_samples", max(1, cap // world))
        shards = listed
    return ShardMultiCropDataset(shards, split, kwargs.pop("transform", None), resampled=resampled,
                                 **kwargs)
