"""Mask pictures: a readable PNG per batch, any crop dtype, atomic writes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hjepa_core.data import MultiCropBatch, MultiCropCollator, MultiCropDataset, MultiCropTransform
from hjepa_core.data.sources import ArrayImageDataset
from hjepa_core.masks import HierarchicalMasks, MultiCropMaskGenerator, render_multicrop_masks
from hjepa_core.masks.visualize import block_rectangles, crop_to_display


def _batch(source: ArrayImageDataset, strategy: str, normalized: bool, n: int = 3) -> MultiCropBatch:
    transform = MultiCropTransform(num_local_crops=4, global_crop_size=64, local_crop_size=32)
    dataset = MultiCropDataset(source, transform)
    masks = MultiCropMaskGenerator(global_crop_size=64, local_crop_size=32, patch_size=8, num_hierarchies=2,
                                   num_local_crops=4, masking_strategy=strategy)
    collate = MultiCropCollator(transform.photometric, masks, defer_photometric=not normalized)
    return collate([dataset[(i, i)] for i in range(n)])


@pytest.mark.parametrize(
    ("strategy", "normalized"),
    [("global_only", True), ("global_with_local_context", False), ("cross_crop_prediction", True)],
)
def test_renders_a_png(tmp_path: Path, tiny_source: ArrayImageDataset, strategy: str,
                       normalized: bool) -> None:
    batch = _batch(tiny_source, strategy, normalized)
    out = render_multicrop_masks(batch, tmp_path / "nested" / "masks.png", max_images=2,
                                 panel_size=48)
    assert out == tmp_path / "nested" / "masks.png"
    with Image.open(out) as image:
        assert image.format == "PNG"
        assert image.size == (6 * 48 + 5 * 6, 2 * 48 + 6 + 46 + 48)  # panels + gaps + margins
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 10  # something was drawn
    assert [p.name for p in out.parent.iterdir()] == ["masks.png"]  # no temp files left


def test_max_images_sets_the_number_of_rows(tmp_path: Path, tiny_source: ArrayImageDataset) -> None:
    batch = _batch(tiny_source, "cross_crop_prediction", True, n=3)
    heights = []
    for rows in (1, 3, 10):
        path = render_multicrop_masks(batch, tmp_path / f"{rows}.png", max_images=rows,
                                      panel_size=32)
        with Image.open(path) as image:
            heights.append(image.height)
    assert heights[0] < heights[1] == heights[2]  # 10 is capped at the batch size
    with pytest.raises(ValueError, match="max_images"):
        render_multicrop_masks(batch, tmp_path / "x.png", max_images=0)


def test_batch_without_masks_is_an_error(tmp_path: Path, tiny_source: ArrayImageDataset) -> None:
    batch = _batch(tiny_source, "global_only", True)
    batch.masks = None
    with pytest.raises(ValueError, match="mask_generator"):
        render_multicrop_masks(batch, tmp_path / "x.png")


def test_write_is_atomic(tmp_path: Path, tiny_source: ArrayImageDataset,
                         monkeypatch: pytest.MonkeyPatch) -> None:
    batch = _batch(tiny_source, "global_only", True)
    target = tmp_path / "masks.png"
    render_multicrop_masks(batch, target, max_images=1, panel_size=32)
    before = target.read_bytes()
    from matplotlib.figure import Figure

    def broken_savefig(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError, match="disk full"):
        render_multicrop_masks(batch, target, max_images=1, panel_size=32)
    assert target.read_bytes() == before  # the old picture is intact
    assert [p.name for p in tmp_path.iterdir()] == ["masks.png"]


def test_crop_to_display_inverts_normalisation() -> None:
    pixels = torch.randint(0, 256, (1, 3, 8, 8), dtype=torch.uint8)
    transform = MultiCropTransform(num_local_crops=0, global_crop_size=8, local_crop_size=8,
                                   global_color_jitter=0.0)
    normalized = transform.photometric.global_aug(pixels)[0]
    shown = crop_to_display(normalized, normalized=True)
    expected = pixels[0].permute(1, 2, 0).numpy() / 255.0
    assert shown.shape == (8, 8, 3)
    np.testing.assert_allclose(shown, expected, atol=1e-5)
    np.testing.assert_allclose(crop_to_display(pixels[0], normalized=False), expected, atol=1e-6)


def test_block_rectangles_are_in_fine_cells() -> None:
    masks = HierarchicalMasks(
        context=torch.tensor([[0]]),
        # level 0: a 2x2 block at rows 1-2, cols 2-3 of a 4x4 grid; level 1: cell (1, 0) of 2x2
        targets=[torch.tensor([[[6, 7, 10, 11]]]), torch.tensor([[[2]]])],
        grid_sizes=[4, 2],
    )
    assert block_rectangles(masks, 0) == [(0, 1, 3, 2, 4), (1, 2, 4, 0, 2)]
