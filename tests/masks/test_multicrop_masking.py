"""Multi-crop masking strategies: roles, invariants per strategy, determinism, config errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hjepa_core.masks import (
    MASKING_STRATEGIES,
    MaskConfigError,
    MultiCropMaskGenerator,
    MultiCropMasks,
    local_roles,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_seed_parameters(mask_invariants) -> None:
    generator = MultiCropMaskGenerator()  # 2 x 224 + 6 x 96, global_only, 3 levels, 4 blocks
    masks = generator(4, generator=_gen(0))
    assert isinstance(masks, MultiCropMasks)
    assert masks.strategy == "global_only" and generator.num_hierarchies == 3
    assert len(masks.global_masks) == 2 and masks.num_local_crops == 6
    assert masks.local_grid == 6  # 96 / 16
    for crop_masks in masks.global_masks:
        mask_invariants(crop_masks, generator.global_generator, 4)


def test_roles_per_strategy() -> None:
    assert local_roles("global_only", 3) == ("unmasked",) * 3
    assert local_roles("global_with_local_context", 2) == ("context",) * 2
    assert local_roles("cross_crop_prediction", 6) == ("target",) * 3 + ("context",) * 3
    assert local_roles("cross_crop_prediction", 5) == ("target",) * 2 + ("context",) * 3
    assert local_roles("cross_crop_prediction", 2, target_fraction=1.0) == ("target",) * 2
    with pytest.raises(MaskConfigError, match="masking_strategy"):
        local_roles("random", 6)


def test_cross_crop_prediction_is_half_targets_half_context() -> None:
    masks = MultiCropMaskGenerator(masking_strategy="cross_crop_prediction")(2, generator=_gen(0))
    assert masks.local_indices("target") == [0, 1, 2]
    assert masks.local_indices("context") == [3, 4, 5]
    assert masks.local_indices("unmasked") == []


def test_strategies_differ_in_local_roles() -> None:
    roles = {s: MultiCropMaskGenerator(masking_strategy=s)(1).local_roles
             for s in MASKING_STRATEGIES}
    assert len(set(roles.values())) == len(MASKING_STRATEGIES)


@settings(max_examples=25, deadline=None, database=None)
@given(
    strategy=st.sampled_from(MASKING_STRATEGIES),
    num_global=st.integers(1, 3),
    num_local=st.integers(2, 8),
    override=st.one_of(st.none(), st.integers(2, 10)),
    batch=st.integers(1, 16),
    seed=st.integers(0, 2**31),
)
def test_invariants_for_every_strategy(mask_invariants, strategy: str, num_global: int, num_local: int,
                                       override: int | None, batch: int, seed: int) -> None:
    generator = MultiCropMaskGenerator(global_crop_size=128, local_crop_size=64, patch_size=16,
                                       num_global_crops=num_global, num_local_crops=num_local,
                                       masking_strategy=strategy, num_hierarchies=2)
    masks = generator(batch, num_local_crops=override, generator=_gen(seed))
    n_local = num_local if override is None else override
    assert masks.local_roles == local_roles(strategy, n_local)
    assert len(masks.global_masks) == num_global
    for crop_masks in masks.global_masks:
        mask_invariants(crop_masks, generator.global_generator, batch)
    if strategy == "cross_crop_prediction":
        assert len(masks.local_indices("target")) == n_local // 2
        assert len(masks.local_indices("context")) == n_local - n_local // 2


def test_deterministic_for_a_seed_and_different_across_seeds() -> None:
    generator = MultiCropMaskGenerator(masking_strategy="global_with_local_context")

    def flat(m: MultiCropMasks) -> list[torch.Tensor]:
        return [t for g in m.global_masks for t in (g.context, *g.targets)]

    a, b, c = (flat(generator(8, generator=_gen(s))) for s in (3, 3, 4))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, c, strict=True))
    seeded = [flat(MultiCropMaskGenerator(seed=11)(4)) for _ in range(2)]
    assert all(torch.equal(x, y) for x, y in zip(*seeded, strict=True))


def test_global_crops_get_their_own_masks() -> None:
    masks = MultiCropMaskGenerator()(8, generator=_gen(0))
    first, second = masks.global_masks
    assert not (torch.equal(first.targets[0], second.targets[0])
                and torch.equal(first.context, second.context))


def test_to_device_keeps_roles() -> None:
    masks = MultiCropMaskGenerator(masking_strategy="cross_crop_prediction")(2).to("cpu")
    assert masks.local_roles == local_roles("cross_crop_prediction", 6)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"masking_strategy": "everything"}, "masking_strategy"),
     ({"masking_strategy": "cross_crop_prediction", "num_local_crops": 1}, "num_local_crops"),
     ({"masking_strategy": "cross_crop_prediction", "num_local_crops": 2, "cross_crop_target_fraction": 0.4},
      "num_local_crops"),
     ({"cross_crop_target_fraction": 0.0}, "cross_crop_target_fraction"),
     ({"local_crop_size": 100}, "local_crop_size"),
     ({"global_crop_size": 200}, "patch_size"),
     ({"num_global_crops": 0}, "num_global_crops"),
     ({"num_hierarchies": 5}, "num_hierarchies"),
     ({"base_scale": (0.2, 0.1)}, "base_scale"),
     ({"aspect_ratio_range": (0.0, 1.0)}, "aspect_ratio_range"),
     ({"num_target_masks": 0}, "num_target_masks")],
)
def test_invalid_combinations_name_the_parameter(kwargs: dict, name: str) -> None:
    with pytest.raises(MaskConfigError, match=name):
        MultiCropMaskGenerator(**kwargs)


@pytest.mark.parametrize("strategy", MASKING_STRATEGIES)
def test_local_mask_ratio_keeps_a_fixed_random_subset_of_each_encoded_local_crop(strategy) -> None:
    generator = MultiCropMaskGenerator(32, 16, 2, 4, strategy, num_hierarchies=2, patch_size=4,
                                       local_mask_ratio=0.5)
    masks = generator(3, generator=_gen(0))
    encoded = sum(role != "target" for role in masks.local_roles)
    assert masks.local_keep is not None and masks.local_keep.shape == (encoded * 3, 8)
    assert (masks.local_keep.diff(dim=1) > 0).all() and masks.local_keep.max() < 16
    assert len({tuple(row.tolist()) for row in masks.local_keep}) > 1  # random per crop
    unmasked = MultiCropMaskGenerator(32, 16, 2, 4, strategy, num_hierarchies=2, patch_size=4)(3, generator=_gen(0))
    assert unmasked.local_keep is None


def test_local_mask_ratio_out_of_range_is_an_error() -> None:
    with pytest.raises(MaskConfigError, match="local_mask_ratio"):
        MultiCropMaskGenerator(32, 16, 2, 4, patch_size=4, num_hierarchies=2, local_mask_ratio=1.0)
