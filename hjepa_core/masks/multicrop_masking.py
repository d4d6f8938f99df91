"""Masks for a multi-crop batch under the three masking strategies.

Global crops always get hierarchical masks (:class:`HierarchicalMaskGenerator`). What local
crops do depends on the strategy:

* ``global_only``: local crops are unmasked; the model encodes them and ties them to the
  global views (local -> global representation prediction).
* ``global_with_local_context``: as above, and their tokens also join the predictor's
  context when it predicts the global crops' targets (multi-scale fusion).
* ``cross_crop_prediction``: the first half (``cross_crop_target_fraction``) of the local crops
  are prediction targets (their target features are predicted from a global crop's context at
  their source-frame positions); the others are context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from hjepa_core.constants import GLOBAL_CROP_SIZE, LOCAL_CROP_SIZE, NUM_GLOBAL_CROPS, NUM_LOCAL_CROPS
from hjepa_core.masks.hierarchical import HierarchicalMaskGenerator, HierarchicalMasks, MaskConfigError, random_subset

MASKING_STRATEGIES = ("global_only", "global_with_local_context", "cross_crop_prediction")
LOCAL_UNMASKED, LOCAL_CONTEXT, LOCAL_TARGET = "unmasked", "context", "target"


def local_roles(strategy: str, num_local_crops: int, target_fraction: float = 0.5) -> tuple[str, ...]:
    """The role of each local crop under ``strategy``; under ``cross_crop_prediction`` the first
    ``int(num_local_crops * target_fraction)`` crops are targets."""
    if strategy == "global_only":
        return (LOCAL_UNMASKED,) * num_local_crops
    if strategy == "global_with_local_context":
        return (LOCAL_CONTEXT,) * num_local_crops
    if strategy == "cross_crop_prediction":
        n_target = int(num_local_crops * target_fraction)
        return (LOCAL_TARGET,) * n_target + (LOCAL_CONTEXT,) * (num_local_crops - n_target)
    raise MaskConfigError(
        f"unknown masking_strategy {strategy!r}; choose one of {', '.join(MASKING_STRATEGIES)}"
    )


@dataclass
class MultiCropMasks:
    """Masks for one multi-crop batch.

    Attributes:
        global_masks: one :class:`HierarchicalMasks` per global crop.
        local_roles: per local crop, ``"unmasked"``, ``"context"`` or ``"target"``.
        local_grid: patch-grid side of a local crop.
        strategy: the masking strategy that made these masks.
        local_keep: (L*B, K) sorted patch indices each encoded local crop keeps (crop-major, as the
            local crops are batched), or None when local crops keep all their patches.
    """

    global_masks: list[HierarchicalMasks]
    local_roles: tuple[str, ...]
    local_grid: int
    strategy: str
    local_keep: Tensor | None = None

    @property
    def num_local_crops(self) -> int:
        return len(self.local_roles)

    def local_indices(self, role: str) -> list[int]:
        """Positions (0-based, among local crops) of the local crops with ``role``."""
        return [i for i, r in enumerate(self.local_roles) if r == role]

    def to(self, device: torch.device | str) -> MultiCropMasks:
        keep = self.local_keep.to(device, non_blocking=True) if self.local_keep is not None else None
        return MultiCropMasks([m.to(device) for m in self.global_masks], self.local_roles,
                              self.local_grid, self.strategy, keep)


class MultiCropMaskGenerator:
    """Builds :class:`MultiCropMasks` for ``batch_size`` images.

    Args:
        global_crop_size, local_crop_size, num_global_crops, num_local_crops: as the transform.
        masking_strategy: ``global_only`` | ``global_with_local_context`` | ``cross_crop_prediction``.
        num_hierarchies, num_target_masks, base_scale, aspect_ratio_range: hierarchical masks
            of the global crops (see :class:`HierarchicalMaskGenerator`).
        patch_size: ViT patch side; both crop sizes must be multiples of it.
        local_mask_ratio: fraction of each encoded local crop's patches dropped before the
            encoder (random per crop, I-JEPA-style token dropping): local crops cost less and
            their prediction of the global views gets harder.
        seed: makes calls without an explicit generator deterministic.
        **kwargs: passed on to :class:`HierarchicalMaskGenerator` (``level_scale_growth``,
            ``context_scale``, ``min_context_patches``, ``pad_targets``).
    """

    def __init__(
        self,
        global_crop_size: int = GLOBAL_CROP_SIZE,
        local_crop_size: int = LOCAL_CROP_SIZE,
        num_global_crops: int = NUM_GLOBAL_CROPS,
        num_local_crops: int = NUM_LOCAL_CROPS,
        masking_strategy: str = "global_only",
        num_hierarchies: int = 3,
        num_target_masks: int = 4,
        base_scale: tuple[float, float] = (0.05, 0.15),
        aspect_ratio_range: tuple[float, float] = (0.75, 1.5),
        patch_size: int = 16,
        local_mask_ratio: float = 0.0,
        cross_crop_target_fraction: float = 0.5,
        seed: int | None = None,
        **kwargs,
    ) -> None:
        local_roles(masking_strategy, num_local_crops, cross_crop_target_fraction)
        if not 0.0 <= local_mask_ratio < 1.0:
            raise MaskConfigError(f"local_mask_ratio must be in [0, 1), got {local_mask_ratio}")
        if local_crop_size % patch_size:
            raise MaskConfigError(
                f"local_crop_size {local_crop_size} is not divisible by patch_size {patch_size}"
            )
        if not 0.0 < cross_crop_target_fraction <= 1.0:
            raise MaskConfigError(f"cross_crop_target_fraction must be in (0, 1], got {cross_crop_target_fraction}")
        if masking_strategy == "cross_crop_prediction" and int(num_local_crops * cross_crop_target_fraction) < 1:
            raise MaskConfigError(
                f"cross_crop_prediction with cross_crop_target_fraction={cross_crop_target_fraction} makes no "
                f"local crop a target with num_local_crops={num_local_crops}: use more local crops or a larger fraction"
            )
        if num_global_crops < 1:
            raise MaskConfigError(f"num_global_crops must be >= 1, got {num_global_crops}")
        self.global_generator = HierarchicalMaskGenerator(
            input_size=global_crop_size,
            patch_size=patch_size,
            num_hierarchies=num_hierarchies,
            num_target_masks=num_target_masks,
            base_scale=base_scale,
            aspect_ratio_range=aspect_ratio_range,
            **kwargs,
        )
        self.global_crop_size = global_crop_size
        self.local_crop_size = local_crop_size
        self.num_global_crops = num_global_crops
        self.num_local_crops = num_local_crops
        self.masking_strategy = masking_strategy
        self.patch_size = patch_size
        local_patches = (local_crop_size // patch_size) ** 2
        self.local_keep_count = max(1, round(local_patches * (1.0 - local_mask_ratio)))
        self.local_mask_ratio = local_mask_ratio
        self.cross_crop_target_fraction = cross_crop_target_fraction
        self._generator = torch.Generator().manual_seed(seed) if seed is not None else None

    @property
    def num_hierarchies(self) -> int:
        return self.global_generator.num_hierarchies

    def __call__(
        self,
        batch_size: int,
        num_local_crops: int | None = None,
        generator: torch.Generator | None = None,
    ) -> MultiCropMasks:
        """Masks for a batch; ``num_local_crops`` overrides the count (adaptive multi-crop)."""
        generator = generator if generator is not None else self._generator
        n_local = self.num_local_crops if num_local_crops is None else num_local_crops
        # One draw for all global crops: equal context sizes, so the model encodes every
        # global crop in one batched call.
        joint = self.global_generator(batch_size * self.num_global_crops, generator)
        roles = local_roles(self.masking_strategy, n_local, self.cross_crop_target_fraction)
        local_grid = self.local_crop_size // self.patch_size
        encoded = sum(role != LOCAL_TARGET for role in roles)
        local_keep = None
        if self.local_keep_count < local_grid**2 and encoded:
            every_patch = torch.ones(encoded * batch_size, local_grid**2, dtype=torch.bool)
            local_keep = random_subset(every_patch, self.local_keep_count, generator)
        return MultiCropMasks(
            joint.split(batch_size),
            roles,
            local_grid,
            self.masking_strategy,
            local_keep,
        )
