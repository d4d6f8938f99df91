"""Multi-crop transforms: counts and shapes, recorded geometry, odd inputs, adaptive schedule."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from hjepa_core.data.multicrop_transforms import (
    AdaptiveMultiCropTransform,
    EvalTransform,
    MultiCropEvalTransform,
    MultiCropTransform,
    build_multicrop_transform,
    sample_resized_crop_box,
)

MODES = ("L", "RGB", "RGBA", "P", "I;16", "CMYK", "1", "LA", "F")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_seed_parameters_give_two_global_and_six_local_crops(make_image) -> None:
    transform = MultiCropTransform()  # the spec's defaults: 2 x 224 + 6 x 96
    views = transform.sample_views(make_image(60, 45), _gen(0))
    assert views.num_global_crops == 2
    assert [tuple(c.shape) for c in views.crops] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 6
    assert all(c.dtype == torch.uint8 for c in views.crops)
    assert len(views.geometry) == 8
    crops = transform(make_image(60, 45), _gen(0))
    assert [tuple(c.shape) for c in crops] == [(3, 224, 224)] * 2 + [(3, 96, 96)] * 6
    assert all(c.dtype == torch.float32 for c in crops)


def _expected_crop(source: Image.Image, box: tuple[int, int, int, int], size: int,
                   flipped: bool, use_box_arg: bool) -> np.ndarray:
    if use_box_arg:
        region = source.resize((size, size), Image.Resampling.BILINEAR, box=box)
    else:
        region = source.crop(box).resize((size, size), Image.Resampling.BILINEAR)
    if flipped:
        region = region.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(region).astype(np.int16)


@pytest.mark.parametrize("seed", range(4))
def test_recorded_box_is_the_region_that_was_cropped(make_image, seed: int) -> None:
    source = make_image(90, 70, seed=seed)
    transform = MultiCropTransform(num_local_crops=4, global_crop_size=48, local_crop_size=24,
                                   flip_prob=0.5)
    views = transform.sample_views(source, _gen(seed))
    flips = set()
    for crop, geo in zip(views.crops, views.geometry, strict=True):
        size = crop.shape[-1]
        got = crop.permute(1, 2, 0).numpy().astype(np.int16)
        assert geo.source_size == (90, 70)
        exact = _expected_crop(source, geo.box, size, geo.flipped, use_box_arg=False)
        assert np.abs(got - exact).max() <= 1  # same pixels, up to rounding
        with_box = _expected_crop(source, geo.box, size, geo.flipped, use_box_arg=True)
        assert np.abs(got - with_box).mean() < 1.0  # PIL's box= differs only at the border
        # The mirrored crop is a different (worse) match when the image is not symmetric.
        wrong = _expected_crop(source, geo.box, size, not geo.flipped, use_box_arg=False)
        assert np.abs(got - wrong).mean() > np.abs(got - exact).mean()
        x0, y0, x1, y1 = geo.normalized_box()
        assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
        flips.add(geo.flipped)
    assert seed != 0 or flips == {True, False}  # seed 0 shows both cases


def test_flip_probability_extremes(make_image) -> None:
    image = make_image(40, 40)
    never = MultiCropTransform(num_local_crops=2, global_crop_size=16, local_crop_size=8,
                               flip_prob=0.0).sample_views(image, _gen(0))
    always = MultiCropTransform(num_local_crops=2, global_crop_size=16, local_crop_size=8,
                                flip_prob=1.0).sample_views(image, _gen(0))
    assert not any(g.flipped for g in never.geometry)
    assert all(g.flipped for g in always.geometry)


@settings(max_examples=40, deadline=None, database=None)
@given(
    width=st.integers(1, 600),
    height=st.integers(1, 600),
    low=st.floats(0.01, 1.0),
    span=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31),
)
def test_sampled_boxes_fit_and_honour_scale(width: int, height: int, low: float, span: float,
                                            seed: int) -> None:
    scale = (low, min(1.0, low + span))
    ratio = (3 / 4, 4 / 3)
    left, top, right, bottom = sample_resized_crop_box(width, height, scale, ratio, _gen(seed))
    assert 0 <= left < right <= width and 0 <= top < bottom <= height
    w, h = right - left, bottom - top
    fallback = (w == width or h == height) and left == (width - w) // 2 and top == (height - h) // 2
    if not fallback:  # a drawn box: area and aspect within range up to rounding
        area = width * height
        assert (math.sqrt(scale[0] * area) - 1) ** 2 <= w * h <= (math.sqrt(scale[1] * area) + 1) ** 2
        assert (w - 0.5) / (h + 0.5) <= ratio[1] + 1e-9
        assert (w + 0.5) / max(h - 0.5, 1e-9) >= ratio[0] - 1e-9


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [(5, 3), (40, 30)])
def test_any_mode_and_images_smaller_than_the_crop(make_image, mode: str,
                                                   size: tuple[int, int]) -> None:
    image = make_image(*size, mode=mode)
    assert image.mode == mode
    transform = MultiCropTransform(num_local_crops=3, global_crop_size=64, local_crop_size=32)
    views = transform.sample_views(image, _gen(1))
    assert [tuple(c.shape) for c in views.crops] == [(3, 64, 64)] * 2 + [(3, 32, 32)] * 3
    for geo in views.geometry:
        assert geo.source_size == size
        left, top, right, bottom = geo.box
        assert 0 <= left < right <= size[0] and 0 <= top < bottom <= size[1]


def test_deterministic_for_a_seed_and_different_across_seeds(make_image) -> None:
    image = make_image(50, 40)
    transform = MultiCropTransform(num_local_crops=2, global_crop_size=32, local_crop_size=16)
    a = transform(image, _gen(7))
    b = transform(image, _gen(7))
    c = transform(image, _gen(8))
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    assert any(not torch.equal(x, y) for x, y in zip(a, c, strict=True))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"num_global_crops": 0}, "num_global_crops"), ({"num_local_crops": -1}, "num_local_crops"),
     ({"global_crop_size": 64, "local_crop_size": 96}, "local_crop_size"),
     ({"global_crop_scale": (0.0, 1.0)}, "global_crop_scale"),
     ({"local_crop_scale": (0.5, 0.4)}, "local_crop_scale"), ({"flip_prob": 1.5}, "flip_prob")],
)
def test_invalid_parameters_name_the_parameter(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        MultiCropTransform(**kwargs)


def test_adaptive_schedule() -> None:
    transform = AdaptiveMultiCropTransform(min_local_crops=2, max_local_crops=10, warmup_epochs=8,
                                           global_crop_size=32, local_crop_size=16)
    counts = [transform.local_crops_at(e) for e in range(12)]
    assert counts[0] == 2 and counts[8] == 10 and counts[11] == 10
    assert counts == sorted(counts)
    assert transform.current_num_local_crops() == 2
    transform.set_epoch(4)
    assert transform.epoch == 4 and transform.current_num_local_crops() == 6
    views = transform.sample_views(Image.new("RGB", (20, 20)), _gen(0))
    assert len(views.crops) == 2 + 6
    no_warmup = AdaptiveMultiCropTransform(min_local_crops=2, max_local_crops=5, warmup_epochs=0)
    assert no_warmup.current_num_local_crops() == 5


def test_adaptive_invalid_parameters() -> None:
    with pytest.raises(ValueError, match="min_local_crops"):
        AdaptiveMultiCropTransform(min_local_crops=5, max_local_crops=2)
    with pytest.raises(ValueError, match="warmup_epochs"):
        AdaptiveMultiCropTransform(warmup_epochs=-1)


def test_build_multicrop_transform() -> None:
    plain = build_multicrop_transform(num_local_crops=3, global_crop_size=64, local_crop_size=32,
                                      global_crop_scale=(0.6, 1.0), local_crop_scale=(0.2, 0.6))
    assert type(plain) is MultiCropTransform
    assert plain.num_local_crops == 3 and plain.global_crop_scale == (0.6, 1.0)
    assert plain.photometric.global_aug.policy.color_jitter == 0.4
    adaptive = build_multicrop_transform(adaptive=True, min_local_crops=1, max_local_crops=4,
                                         warmup_epochs=3, local_color_jitter=0.2)
    assert isinstance(adaptive, AdaptiveMultiCropTransform)
    assert adaptive.current_num_local_crops() == 1
    assert adaptive.photometric.local_aug.policy.color_jitter == 0.2


def test_eval_transform(make_image) -> None:
    assert MultiCropEvalTransform is EvalTransform  # the spec's name
    transform = EvalTransform(crop_size=32, resize_ratio=1.0)
    out = transform(make_image(60, 40))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    tiny = transform.pixels(make_image(6, 4, mode="L"))
    assert tiny.shape == (3, 32, 32) and tiny.dtype == torch.uint8
    with pytest.raises(ValueError, match="resize_ratio"):
        EvalTransform(resize_ratio=0.0)
