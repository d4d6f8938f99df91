"""Hierarchical block masks: shapes, invariants (property-based), determinism, config errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from hjepa_core.masks import HierarchicalMaskGenerator, HierarchicalMasks, MaskConfigError


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_shapes_for_the_seed_parameters(mask_invariants) -> None:
    generator = HierarchicalMaskGenerator()  # 224 / 16: a 14 x 14 grid, 3 levels, 4 blocks
    masks = generator(8, _gen(0))
    assert generator.grid_sizes == [14, 7, 3]
    assert [tuple(t.shape[:2]) for t in masks.targets] == [(8, 4)] * 3
    mask_invariants(masks, generator, 8)


@settings(max_examples=30, deadline=None, database=None)
@given(
    grid=st.integers(6, 16),
    num_hierarchies=st.integers(1, 3),
    num_target_masks=st.integers(1, 4),
    low=st.floats(0.02, 0.15),
    span=st.floats(0.0, 0.1),
    aspect_low=st.floats(0.5, 1.0),
    aspect_span=st.floats(0.0, 1.0),
    growth=st.sampled_from([0.5, 1.0]),
    batch=st.integers(1, 12),
    seed=st.integers(0, 2**31),
)
def test_mask_invariants(mask_invariants, grid: int, num_hierarchies: int, num_target_masks: int,
                         low: float, span: float, aspect_low: float, aspect_span: float,
                         growth: float, batch: int, seed: int) -> None:
    try:
        generator = HierarchicalMaskGenerator(
            input_size=grid * 8, patch_size=8, num_hierarchies=num_hierarchies,
            num_target_masks=num_target_masks, base_scale=(low, low + span),
            aspect_ratio_range=(aspect_low, aspect_low + aspect_span),
            level_scale_growth=growth,
        )
    except MaskConfigError:
        assume(False)
    try:
        masks = generator(batch, _gen(seed))
    except MaskConfigError as exc:  # redraws exhausted: must say what to change
        assert "num_target_masks" in str(exc)
        return
    mask_invariants(masks, generator, batch)


def test_unpadded_targets_are_the_padded_cells_without_the_padding(mask_invariants) -> None:
    """``pad_targets=False`` (eager mode) draws the same context and blocks as the padded masks
    (static shapes for torch.compile) and drops only the padding."""
    padded_gen = HierarchicalMaskGenerator(input_size=128, patch_size=16, num_hierarchies=2)
    exact_gen = HierarchicalMaskGenerator(input_size=128, patch_size=16, num_hierarchies=2, pad_targets=False)
    shorter = 0
    for seed in range(5):
        padded, exact = padded_gen(16, _gen(seed)), exact_gen(16, _gen(seed))
        mask_invariants(exact, exact_gen, 16)
        assert exact.target_valid is None
        assert torch.equal(padded.context, exact.context)
        for blocks, cells, valid in zip(padded.targets, exact.targets, padded.target_valid, strict=True):
            real = int(valid[0, 0].sum())
            assert torch.equal(blocks[..., :real], cells)
            shorter += cells.shape[-1] < blocks.shape[-1]
    assert shorter, "no batch drew a block smaller than the padded size"


def test_deterministic_for_a_seed_and_different_across_seeds() -> None:
    generator = HierarchicalMaskGenerator()
    a, b, c = generator(16, _gen(1)), generator(16, _gen(1)), generator(16, _gen(2))
    assert torch.equal(a.context, b.context)
    assert all(torch.equal(x, y) for x, y in zip(a.targets, b.targets, strict=True))
    assert not (torch.equal(a.context, c.context)
                and all(torch.equal(x, y) for x, y in zip(a.targets, c.targets, strict=True)))
    seeded = [HierarchicalMaskGenerator(seed=5)(4) for _ in range(2)]
    assert torch.equal(seeded[0].context, seeded[1].context)


def test_target_coverage_maps_coarse_cells_to_fine_patches() -> None:
    masks = HierarchicalMasks(
        context=torch.tensor([[0]]),
        targets=[torch.tensor([[[5]]]), torch.tensor([[[3]]])],  # fine cell 5; level-1 cell 3
        grid_sizes=[4, 2],
    )
    covered = masks.target_coverage().view(4, 4)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[1, 1] = True  # fine index 5 = row 1, col 1
    expected[2:4, 2:4] = True  # level-1 cell 3 = rows/cols 2-3 on the fine grid
    assert torch.equal(covered, expected)
    assert masks.to("cpu").grid_sizes == [4, 2]


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"input_size": 100, "patch_size": 16}, "patch_size"),
     ({"num_hierarchies": 0}, "num_hierarchies"),
     ({"num_target_masks": 0}, "num_target_masks"),
     ({"input_size": 32, "patch_size": 16, "num_hierarchies": 3}, "num_hierarchies"),
     ({"base_scale": (0.3, 0.1)}, "base_scale"),
     ({"aspect_ratio_range": (2.0, 1.0)}, "aspect_ratio_range"),
     ({"context_scale": (0.0, 1.0)}, "context_scale"),
     ({"base_scale": (0.5, 0.9), "num_hierarchies": 1}, "base_scale"),
     ({"num_target_masks": 40, "base_scale": (0.2, 0.3), "num_hierarchies": 1},
      "num_target_masks")],
)
def test_invalid_parameters_name_the_parameter(kwargs: dict, name: str) -> None:
    with pytest.raises(MaskConfigError, match=name):
        HierarchicalMaskGenerator(**kwargs)


def test_mask_config_error_is_a_value_error() -> None:
    assert issubclass(MaskConfigError, ValueError)


def test_a_batch_whose_block_shapes_leave_too_little_context_draws_new_shapes(mask_invariants) -> None:
    generator = HierarchicalMaskGenerator(input_size=32, patch_size=4, num_hierarchies=2, num_target_masks=4)
    sample_shapes = generator._sample_shapes
    calls = []

    def first_too_large(gen):
        calls.append(1)
        shapes, context = sample_shapes(gen)
        if len(calls) == 1:  # every level's blocks cover the whole grid: no context can remain
            return [(side, side) for side in generator.grid_sizes], context
        return shapes, context

    generator._sample_shapes = first_too_large
    masks = generator(16, _gen(0))
    assert len(calls) >= 2
    assert masks.context.shape[1] == generator.context_count
    mask_invariants(masks, generator, 16)
