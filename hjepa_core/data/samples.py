"""One multi-crop sample (crops, label, geometry) and the seed of its augmentation.

The map-style datasets (:mod:`~hjepa_core.data.multicrop_dataset`) and the shard readers
(:mod:`~hjepa_core.data.shards.reader`) both yield these; the collator batches them.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import Tensor

from hjepa_core.data.multicrop_transforms import CropGeometry
from hjepa_core.utils import SEED_MODULUS


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of one sample's augmentation in one epoch."""
    return ((seed * 1_000_003 + epoch) * 2_147_483_647 + index * 6_700_417 + 1) % SEED_MODULUS


@dataclass
class MultiCropSample:
    """One image's crops (uint8, global first), label and crop geometry.

    Unpacks like the spec's ``(crops, label)`` pair.
    """

    crops: list[Tensor]
    label: int
    geometry: list[CropGeometry]
    num_global_crops: int
    index: int = -1
    seed: int | None = None

    def __iter__(self) -> Iterator:
        yield self.crops
        yield self.label
