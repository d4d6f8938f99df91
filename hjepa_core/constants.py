"""Constants shared across layers, importable without torch (the CLI parser reads them)."""

from __future__ import annotations

# Per-channel mean / std of ImageNet: the crops' normalisation (photometric) and its inverse
# for display (mask pictures).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# WebDataset shards (``hjepa shard``): samples per shard when no limit is given, and the
# storage formats (name -> (PIL format, file extension)).
DEFAULT_SAMPLES_PER_SHARD = 5000
SHARD_IMAGE_FORMATS = {"png": ("PNG", "png"), "jpeg": ("JPEG", "jpg")}

# Datasets ``hjepa data fetch`` can put in a folder.
FETCHABLE_DATASETS = ("fashion_mnist",)

# Multi-crop defaults of the spec (DINO's 2 x 224 + 6 x 96): every signature and the
# config schema take their defaults from here.
NUM_GLOBAL_CROPS = 2
NUM_LOCAL_CROPS = 6
GLOBAL_CROP_SIZE = 224
LOCAL_CROP_SIZE = 96
GLOBAL_CROP_SCALE = (0.4, 1.0)
LOCAL_CROP_SCALE = (0.05, 0.4)

EPOCH_SCHEDULE = "training.time_budget_s=null"
"""Goes before the user's overrides wherever a front door is given an epoch count: asking for
epochs means an epoch schedule, also over a config that trains for a time budget."""
