"""Mask test helpers: the invariants every crop's masks must satisfy."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from hjepa_core.masks import HierarchicalMaskGenerator, HierarchicalMasks
from hjepa_core.masks.hierarchical import _block_shape


def check_invariants(masks: HierarchicalMasks, generator: HierarchicalMaskGenerator,
                     batch: int) -> None:
    """Everything a model relies on, for one crop's masks."""
    fine = generator.grid
    assert masks.grid_sizes == [fine // 2**k for k in range(generator.num_hierarchies)]
    assert masks.context.shape[0] == batch
    assert masks.context.shape[1] >= generator.min_context_patches
    assert masks.context.dtype == torch.long
    # Context: sorted, unique, on the fine grid, and never inside any level's target block.
    assert (masks.context[:, 1:] > masks.context[:, :-1]).all()
    assert masks.context.min() >= 0 and masks.context.max() < fine * fine
    covered = masks.target_coverage()
    assert not covered.gather(1, masks.context).any()
    lo_r, hi_r = generator.aspect_ratio_range
    valid_masks = masks.target_valid or [None] * len(masks.targets)
    assert (masks.target_valid is not None) == generator.pad_targets
    for level, (blocks, valid, side) in enumerate(zip(masks.targets, valid_masks, masks.grid_sizes, strict=True)):
        if valid is None:
            targets = blocks
        else:
            # A fixed cell count per level (static shapes): real cells first, then copies of the first.
            assert blocks.shape == valid.shape == (batch, generator.num_target_masks, generator.target_counts[level])
            cells = int(valid[0, 0].sum())
            assert valid[..., :cells].all() and not valid[..., cells:].any()
            assert (blocks[..., cells:] == blocks[..., :1]).all()
            targets = blocks[..., :cells]
        assert targets.min() >= 0 and targets.max() < side * side
        rows, cols = targets // side, targets % side
        heights = rows.amax(-1) - rows.amin(-1) + 1
        widths = cols.amax(-1) - cols.amin(-1) + 1
        # Each block is a full rectangle; one shape per batch and level.
        assert (heights * widths == targets.shape[-1]).all()
        shapes = torch.stack([heights.flatten(), widths.flatten()], dim=1)
        assert len(torch.unique(shapes, dim=0)) == 1
        h, w = int(heights.flatten()[0]), int(widths.flatten()[0])
        lo_s, hi_s = generator.level_scales[level]
        # The shape is round(sqrt(area * aspect)) x round(sqrt(area / aspect)): monotone in
        # scale and aspect, so the extremes bound it exactly (up to that rounding).
        assert _block_shape(lo_s, lo_r, side)[0] <= h <= _block_shape(hi_s, hi_r, side)[0]
        assert _block_shape(lo_s, hi_r, side)[1] <= w <= _block_shape(hi_s, lo_r, side)[1]
        assert len(set(targets[0, 0].tolist())) == h * w


@pytest.fixture(scope="session")
def mask_invariants() -> Callable[[HierarchicalMasks, HierarchicalMaskGenerator, int], None]:
    """``mask_invariants(masks, generator, batch)`` asserts the invariants of one crop's masks."""
    return check_invariants
