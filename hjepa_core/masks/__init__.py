"""Masks for H-JEPA: hierarchical block masks per crop, and multi-crop masking strategies."""

from hjepa_core.masks.hierarchical import HierarchicalMaskGenerator, HierarchicalMasks, MaskConfigError
from hjepa_core.masks.multicrop_masking import (
    MASKING_STRATEGIES,
    MultiCropMaskGenerator,
    MultiCropMasks,
    local_roles,
)
from hjepa_core.masks.visualize import render_multicrop_masks

__all__ = [
    "MASKING_STRATEGIES",
    "HierarchicalMaskGenerator",
    "HierarchicalMasks",
    "MaskConfigError",
    "MultiCropMaskGenerator",
    "MultiCropMasks",
    "local_roles",
    "render_multicrop_masks",
]
