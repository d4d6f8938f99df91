"""Multi-crop datasets, the batch type, its collate function and the seeded loader.

Samples carry uint8 crops plus geometry; the collate function stacks them, runs the batched
photometric augmentation (unless deferred to the training device) and, when given a mask
generator, makes the batch's masks, so all of this happens in DataLoader worker processes.

Randomness is keyed, not streamed: the batch sampler hands every sample a seed derived from
(seed, epoch, index), so a batch's crops and masks do not depend on the number of workers, and
resuming mid-epoch skips batches without loading them.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterator, Sequence, Sized
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from hjepa_core.constants import GLOBAL_CROP_SIZE, LOCAL_CROP_SIZE, NUM_GLOBAL_CROPS, NUM_LOCAL_CROPS
from hjepa_core.data.images import BadImageError
from hjepa_core.data.multicrop_transforms import (
    MultiCropPhotometric,
    MultiCropTransform,
    build_multicrop_transform,
)
from hjepa_core.data.samples import MultiCropSample, sample_seed
from hjepa_core.data.shards import ShardMultiCropDataset, build_shard_multicrop_dataset, shard_spec_from
from hjepa_core.data.sources import build_source
from hjepa_core.masks.multicrop_masking import MultiCropMaskGenerator, MultiCropMasks
from hjepa_core.utils import mix_seeds, rank_world

SampleKey = int | tuple[int, int]


@dataclass
class MultiCropBatch:
    """A collated multi-crop batch; unpacks like the spec's ``(crops, labels)``.

    Attributes:
        crops: ``[global_0, ..., local_n]``, each (B, 3, S, S): normalised float, or uint8 when
            ``normalized`` is False (photometric work deferred to the training device).
        labels: (B,) class labels.
        boxes: (num_crops, B, 4) crop boxes (x0, y0, x1, y1) in [0, 1] source coordinates.
        flips: (num_crops, B) whether each crop was mirrored.
        indices: (B,) dataset indices (-1 for streamed samples).
        num_global_crops: how many of ``crops`` are global.
        masks: the batch's masks when the loader has a mask generator.
        num_skipped: unreadable samples dropped from this batch.
        normalized: whether photometric augmentation and normalisation were applied.
        seed: the batch's seed (photometric and masks), when keyed.
    """

    crops: list[Tensor]
    labels: Tensor
    boxes: Tensor
    flips: Tensor
    indices: Tensor
    num_global_crops: int
    masks: MultiCropMasks | None = None
    num_skipped: int = 0
    normalized: bool = True
    seed: int | None = None

    def __iter__(self) -> Iterator:
        yield self.crops
        yield self.labels

    @property
    def batch_size(self) -> int:
        return self.labels.shape[0]

    @property
    def num_local_crops(self) -> int:
        return len(self.crops) - self.num_global_crops

    def to(self, device: torch.device | str, non_blocking: bool = True) -> MultiCropBatch:
        return MultiCropBatch(
            crops=[c.to(device, non_blocking=non_blocking) for c in self.crops],
            labels=self.labels.to(device, non_blocking=non_blocking),
            boxes=self.boxes.to(device, non_blocking=non_blocking),
            flips=self.flips.to(device, non_blocking=non_blocking),
            indices=self.indices,
            num_global_crops=self.num_global_crops,
            masks=self.masks.to(device) if self.masks is not None else None,
            num_skipped=self.num_skipped,
            normalized=self.normalized,
            seed=self.seed,
        )

    def pin_memory(self) -> MultiCropBatch:
        """Called by DataLoader(pin_memory=True)."""
        self.crops = [c.pin_memory() for c in self.crops]
        self.labels = self.labels.pin_memory()
        self.boxes = self.boxes.pin_memory()
        self.flips = self.flips.pin_memory()
        return self


class MultiCropDataset(Dataset):
    """Wraps any dataset of ``(image, label)`` with a multi-crop transform.

    ``dataset[i]`` uses the global torch RNG; ``dataset[(i, seed)]`` (what the seeded loader
    asks for) is reproducible. With ``skip_bad_images`` an unreadable image yields ``None``,
    which the collate function drops and counts; otherwise the error names the file.
    """

    def __init__(
        self,
        dataset: Dataset,
        transform: MultiCropTransform | None = None,
        skip_bad_images: bool = True,
        **transform_kwargs,
    ) -> None:
        self.dataset = dataset
        self.transform = transform or build_multicrop_transform(**transform_kwargs)
        self.skip_bad_images = skip_bad_images

    @property
    def classes(self) -> list[str]:
        return list(getattr(self.dataset, "classes", []))

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: SampleKey) -> MultiCropSample | None:
        index, seed = (key, None) if isinstance(key, int) else key
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        try:
            image, label = self.dataset[index]
        except BadImageError:
            if not self.skip_bad_images:
                raise
            return None
        views = self.transform.sample_views(image, generator)
        return MultiCropSample(views.crops, int(label), views.geometry, views.num_global_crops,
                               index, seed)


class MultiCropDatasetRaw(MultiCropDataset):
    """A multi-crop dataset built straight from a named source (see :func:`build_source`)."""

    def __init__(
        self,
        dataset_name: str = "fashion_mnist",
        data_path: str | None = None,
        split: str = "train",
        transform: MultiCropTransform | None = None,
        skip_bad_images: bool = True,
        max_samples: int | None = None,
        **transform_kwargs,
    ) -> None:
        super().__init__(build_source(dataset_name, data_path, split, max_samples), transform, skip_bad_images,
                         **transform_kwargs)
        self.dataset_name = dataset_name
        self.split = split


def build_multicrop_dataset(
    dataset_name: str = "fashion_mnist",
    data_path: str | None = None,
    split: str = "train",
    num_global_crops: int = NUM_GLOBAL_CROPS,
    num_local_crops: int = NUM_LOCAL_CROPS,
    global_crop_size: int = GLOBAL_CROP_SIZE,
    local_crop_size: int = LOCAL_CROP_SIZE,
    max_samples: int | None = None,
    seed: int = 0,
    **kwargs,
) -> MultiCropDataset | ShardMultiCropDataset:
    """The spec's entry point: a named dataset (or shard URLs) as a multi-crop dataset.

    ``max_samples`` keeps a fixed random subset; ``seed`` seeds a shard stream's order and
    augmentations (map-style data is seeded per batch by the loader's sampler); ``kwargs`` go to
    :func:`build_multicrop_transform` (scales, jitter, adaptive ...). A shard spec as
    ``dataset_name`` or ``data_path`` gives a streaming
    :class:`~hjepa_core.data.shards.ShardMultiCropDataset` (see
    :func:`~hjepa_core.data.shards.build_shard_multicrop_dataset` for its extra ``kwargs``).
    """
    spec = shard_spec_from(dataset_name, data_path)
    if spec is not None:
        return build_shard_multicrop_dataset(
            spec, split, max_samples=max_samples, num_global_crops=num_global_crops,
            num_local_crops=num_local_crops, global_crop_size=global_crop_size,
            local_crop_size=local_crop_size, seed=seed, **kwargs)
    return MultiCropDatasetRaw(
        dataset_name,
        data_path,
        split,
        max_samples=max_samples,
        num_global_crops=num_global_crops,
        num_local_crops=num_local_crops,
        global_crop_size=global_crop_size,
        local_crop_size=local_crop_size,
        **kwargs,
    )


class MultiCropCollator:
    """Collates :class:`MultiCropSample` lists into a :class:`MultiCropBatch`.

    Args:
        photometric: batched photometric augmentation (the transform's); None leaves uint8.
        mask_generator: when given, the batch carries masks made here (in the worker).
        defer_photometric: leave crops uint8 so the training device augments them.
    """

    def __init__(
        self,
        photometric: MultiCropPhotometric | None,
        mask_generator: MultiCropMaskGenerator | None = None,
        defer_photometric: bool = False,
    ) -> None:
        self.photometric = photometric
        self.mask_generator = mask_generator
        self.defer_photometric = defer_photometric

    def __call__(self, samples: Sequence[MultiCropSample | None]) -> MultiCropBatch:
        kept = [s for s in samples if s is not None]
        if not kept:
            raise BadImageError(f"every sample of a batch of {len(samples)} was unreadable")
        # Adaptive multi-crop can change the count mid-batch (set_epoch while a worker is
        # collating): keep the smallest count so the batch always stacks.
        n_crops = min(len(s.crops) for s in kept)
        n_global = kept[0].num_global_crops
        # Stacked as (S, S, 3) and viewed back: the crops' channels-last layout is kept at
        # memcpy speed (no transposing copy here; the photometric pass or the training
        # device converts while it reads them).
        crops = [torch.stack([s.crops[i].permute(1, 2, 0) for s in kept]).permute(0, 3, 1, 2)
                 for i in range(n_crops)]
        boxes = torch.tensor(
            [[s.geometry[i].normalized_box() for s in kept] for i in range(n_crops)], dtype=torch.float32
        )
        flips = torch.tensor([[s.geometry[i].flipped for s in kept] for i in range(n_crops)])
        seeds = [s.seed for s in kept]
        seed = mix_seeds(*seeds) if all(x is not None for x in seeds) else None  # type: ignore[arg-type]
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        normalized = self.photometric is not None and not self.defer_photometric
        if normalized:
            crops = self.photometric(crops, n_global, generator)  # type: ignore[misc]
        masks = None
        if self.mask_generator is not None:
            masks = self.mask_generator(len(kept), num_local_crops=n_crops - n_global, generator=generator)
        return MultiCropBatch(
            crops=crops,
            labels=torch.tensor([s.label for s in kept], dtype=torch.long),
            boxes=boxes,
            flips=flips,
            indices=torch.tensor([s.index for s in kept], dtype=torch.long),
            num_global_crops=n_global,
            masks=masks,
            num_skipped=len(samples) - len(kept),
            normalized=normalized,
            seed=seed,
        )


class SeededBatchSampler(Sampler):
    """Batches of ``(index, sample_seed)`` keys, shuffled per epoch and split across ranks.

    Every rank gets the same number of batches (the tail that does not fill a batch on every
    rank is dropped when ``drop_last``), so DDP ranks never wait on each other.
    """

    def __init__(
        self,
        dataset_size: int,
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if drop_last and dataset_size < batch_size * world_size:
            raise ValueError(
                f"{dataset_size} samples cannot fill one batch of {batch_size} on each of "
                f"{world_size} ranks; lower batch_size or set drop_last=False"
            )
        self.dataset_size = dataset_size
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start_batch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def skip_batches(self, count: int) -> None:
        """The next iteration starts at batch ``count`` (exact mid-epoch resume)."""
        self.start_batch = count

    def __len__(self) -> int:
        per_rank = self.dataset_size // self.world_size
        if self.drop_last:
            return per_rank // self.batch_size
        return math.ceil(math.ceil(self.dataset_size / self.world_size) / self.batch_size)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.dataset_size, generator=generator).tolist()
        else:
            order = list(range(self.dataset_size))
        mine = order[self.rank::self.world_size]
        start, self.start_batch = self.start_batch, 0
        for b in range(start, len(self)):
            chunk = mine[b * self.batch_size:(b + 1) * self.batch_size]
            yield [(i, sample_seed(self.seed, self.epoch, i)) for i in chunk]


def auto_num_workers(device_type: str) -> int:
    """Loader workers for a training device when ``data.num_workers`` is null.

    On CPU the training step's intra-op threads already use every core, so loader workers only
    compete with it (0 workers trained 1-11% more images/s on 2 cores, benchmarks/README.md).
    A GPU step leaves the cores to the loader: each local rank (torchrun's ``LOCAL_WORLD_SIZE``)
    gets its share of the cores this process may run on, less one for itself, at most 8.
    """
    if device_type == "cpu":
        return 0
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, min(8, cores // ranks - 1))


def build_multicrop_dataloader(
    dataset: Dataset,
    batch_size: int = 32,
    num_workers: int = 4,
    shuffle: bool = True,
    drop_last: bool = True,
    seed: int = 0,
    mask_generator: MultiCropMaskGenerator | None = None,
    defer_photometric: bool = False,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
) -> DataLoader:
    """A DataLoader of :class:`MultiCropBatch` for a multi-crop dataset.

    Map-style datasets get a :class:`SeededBatchSampler` (per-rank split from
    ``torch.distributed``, else torchrun's environment, unless ``rank``/``world_size`` are given); streamed (iterable)
    datasets batch themselves in order. ``loader.batch_sampler.set_epoch(e)`` reshuffles.
    """
    transform = getattr(dataset, "transform", None)
    photometric = transform.photometric if transform is not None else None
    if photometric is None:
        warnings.warn("dataset has no multi-crop transform: crops stay uint8", stacklevel=2)
    collator = MultiCropCollator(photometric, mask_generator, defer_photometric)
    rank, world_size = rank_world(rank, world_size)
    common: dict[str, Any] = dict(
        num_workers=num_workers,
        collate_fn=collator,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
    )
    if isinstance(dataset, torch.utils.data.IterableDataset):
        return DataLoader(dataset, batch_size=batch_size, drop_last=drop_last, **common)
    if not isinstance(dataset, Sized):
        raise TypeError(f"a map-style dataset needs __len__ to be batched, got {type(dataset).__name__}")
    sampler = SeededBatchSampler(len(dataset), batch_size, shuffle, drop_last, seed, rank, world_size)
    return DataLoader(dataset, batch_sampler=sampler, **common)
