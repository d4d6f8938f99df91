"""Data: named sources, multi-crop transforms, datasets, collate and loaders."""

from hjepa_core.data.images import BadImageError, load_image, to_rgb
from hjepa_core.data.multicrop_dataset import (
    MultiCropBatch,
    MultiCropCollator,
    MultiCropDataset,
    MultiCropDatasetRaw,
    SeededBatchSampler,
    auto_num_workers,
    build_multicrop_dataloader,
    build_multicrop_dataset,
)
from hjepa_core.data.multicrop_transforms import (
    AdaptiveMultiCropTransform,
    CropGeometry,
    EvalTransform,
    MultiCropEvalTransform,
    MultiCropPhotometric,
    MultiCropTransform,
    build_multicrop_transform,
)
from hjepa_core.data.photometric import AugmentPolicy, BatchPhotometric
from hjepa_core.data.samples import MultiCropSample
from hjepa_core.data.sources import DATASET_NAMES, DatasetNotFoundError, build_source

__all__ = [
    "DATASET_NAMES",
    "AdaptiveMultiCropTransform",
    "AugmentPolicy",
    "BadImageError",
    "BatchPhotometric",
    "CropGeometry",
    "DatasetNotFoundError",
    "EvalTransform",
    "MultiCropBatch",
    "MultiCropCollator",
    "MultiCropDataset",
    "MultiCropDatasetRaw",
    "MultiCropEvalTransform",
    "MultiCropPhotometric",
    "MultiCropSample",
    "MultiCropTransform",
    "SeededBatchSampler",
    "auto_num_workers",
    "build_multicrop_dataloader",
    "build_multicrop_dataset",
    "build_multicrop_transform",
    "build_source",
    "load_image",
    "to_rgb",
]
