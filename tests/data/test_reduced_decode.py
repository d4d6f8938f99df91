"""Decoding only as large as the crops need: DCT-scaled JPEG decode, the torchvision decoder,
and bad images on that path (checked before any pixel is decoded, then skipped and counted)."""

from __future__ import annotations

import io
import math
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from hjepa_core.data import images
from hjepa_core.data.images import MAX_IMAGE_PIXELS, BadImageError, EncodedImage, load_image
from hjepa_core.data.multicrop_transforms import CropGeometry, MultiCropTransform, MultiCropViews
from hjepa_core.data.shards import ShardMultiCropDataset

PSNR_BAR = 28.0  # dB, every crop of a reduced decode against the same crop of the full decode


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Photo-like: a smooth colour field, 40 hard-edged shapes (the detail an undersampled
    decode loses) and sensor noise."""
    rng = np.random.default_rng(seed)
    image = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8)).resize(
        (width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        x1, y1 = x0 + int(rng.integers(4, width // 3)), y0 + int(rng.integers(4, height // 3))
        fill = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=fill)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, 4.0, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _encode(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buffer.getvalue()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return 10 * math.log10(255.0**2 / max(mse, 1e-12))


@pytest.fixture(scope="module")
def large_jpeg() -> tuple[bytes, Image.Image]:
    """A 1600 x 1200 quality-90 JPEG and its full decode: big enough for 1/2 and 1/4 decodes."""
    data = _encode(_photo(1600, 1200))
    return data, load_image(data)


def _reduced_views(transform: MultiCropTransform, data: bytes, seed: int, scale: int) -> MultiCropViews:
    """The views of ``data`` decoded at ``scale`` whatever the crops allow (to show what an
    undersampling rule would do)."""
    image = EncodedImage(data)
    plan = transform.plan_views(*image.size, _gen(seed))
    source, used = image.decode_pixels(scale)
    assert used == scale
    return MultiCropViews(transform.render_views(source, plan, used), [g for _, g in plan], 2)


@pytest.mark.parametrize(("fmt", "mode"), [("JPEG", "RGB"), ("JPEG", "L"), ("JPEG", "CMYK"),
                                           ("PNG", "RGB"), ("PNG", "RGBA")])
def test_full_size_decode_matches_pil_pixel_for_pixel(fmt: str, mode: str) -> None:
    data = _encode(_photo(500, 375).convert(mode), fmt)
    pixels, scale = EncodedImage(data).decode_pixels()
    assert scale == 1 and pixels.dtype == torch.uint8 and pixels.shape == (1, 3, 375, 500)
    assert pixels.is_contiguous(memory_format=torch.channels_last)
    expected = torch.from_numpy(np.asarray(load_image(data)).copy()).permute(2, 0, 1)
    assert torch.equal(pixels[0], expected)


@pytest.mark.parametrize(("fmt", "mode", "max_scale", "scale"),
                         [("JPEG", "RGB", 2, 2), ("JPEG", "L", 4, 4), ("JPEG", "RGB", 8, 8),
                          ("JPEG", "CMYK", 2, 1), ("PNG", "RGB", 8, 1)])
def test_reduced_decode_sizes(fmt: str, mode: str, max_scale: int, scale: int) -> None:
    """JPEG (RGB or gray) decodes at 1/max_scale, each side rounded up; other images in full."""
    pixels, used = EncodedImage(_encode(_photo(333, 250).convert(mode), fmt)).decode_pixels(max_scale)
    assert used == scale
    assert pixels.shape == (1, 3, -(-250 // scale), -(-333 // scale)) and pixels.dtype == torch.uint8


def test_without_torchvisions_decoder_pil_decodes_the_same_pixels(monkeypatch) -> None:
    data = _encode(_photo(500, 375))
    fast, _ = EncodedImage(data).decode_pixels()
    monkeypatch.setattr(images, "_torchvision_decode_jpeg", lambda: None)
    fallback, scale = EncodedImage(data).decode_pixels()
    assert scale == 1 and torch.equal(fast, fallback)


@pytest.mark.parametrize("seed", range(3))
def test_a_500x375_photo_decodes_at_full_size_and_gives_the_decoded_images_crops(seed: int) -> None:
    """At 2 x 224 + 6 x 96 no crop of a 500 x 375 photo survives a halved decode: the crops
    from the bytes are exactly those from the decoded image, geometry included."""
    transform = MultiCropTransform()
    data = _encode(_photo(500, 375, seed))
    plan = transform.plan_views(500, 375, _gen(seed))
    assert transform.max_decode_scale(plan) == 1
    from_bytes = transform.decode_views(EncodedImage(data), _gen(seed))
    from_image = transform.sample_views(load_image(data), _gen(seed))
    assert from_bytes.geometry == from_image.geometry
    assert all(torch.equal(a, b) for a, b in zip(from_bytes.crops, from_image.crops, strict=True))


def _plan(*boxes_and_sizes: tuple[int, int, int]) -> list[tuple[int, CropGeometry]]:
    """Crops given as (box width, box height, output size)."""
    return [(size, CropGeometry((3, 5, 3 + w, 5 + h), False, (4000, 3000)))
            for w, h, size in boxes_and_sizes]


def test_decode_scale_never_undersamples_a_crop() -> None:
    scale = MultiCropTransform.max_decode_scale
    assert scale(_plan((447, 600, 224))) == 1  # 447 < 2 x 224
    assert scale(_plan((448, 600, 224))) == 2
    assert scale(_plan((900, 896, 224))) == 4
    assert scale(_plan((3000, 2000, 224))) == 8  # 8 is libjpeg's largest
    assert scale(_plan((900, 896, 224), (191, 400, 96))) == 1  # the smallest crop decides
    assert scale(_plan((900, 896, 224), (384, 400, 96))) == 4


def test_reduced_decode_keeps_geometry_and_matches_the_full_decode(large_jpeg) -> None:
    data, full = large_jpeg
    transform = MultiCropTransform()
    scales = []
    for seed in range(8):
        plan = transform.plan_views(*full.size, _gen(seed))
        scales.append(transform.max_decode_scale(plan))
        reduced = transform.decode_views(EncodedImage(data), _gen(seed))
        reference = transform.sample_views(full, _gen(seed))
        assert reduced.geometry == reference.geometry == [g for _, g in plan]
        for a, b in zip(reduced.crops, reference.crops, strict=True):
            assert a.shape == b.shape
            assert _psnr(a, b) >= PSNR_BAR
    assert set(scales) >= {2, 4}  # both reduced decodes were exercised


def test_psnr_bar_catches_an_undersampling_decode(large_jpeg) -> None:
    """Decoding one step smaller than the crops allow drops some crop below the bar, so the
    test above would fail if the decode scale were chosen too small."""
    data, full = large_jpeg
    transform = MultiCropTransform()
    worst = []
    for seed in range(8):
        allowed = transform.max_decode_scale(transform.plan_views(*full.size, _gen(seed)))
        reduced = _reduced_views(transform, data, seed, min(2 * allowed, 8))
        reference = transform.sample_views(full, _gen(seed))
        worst.append(min(_psnr(a, b) for a, b in zip(reduced.crops, reference.crops, strict=True)))
    assert min(worst) < PSNR_BAR - 1.0


def _jpeg_with_size(width: int, height: int) -> bytes:
    """A valid small JPEG whose frame header claims ``width`` x ``height``."""
    data = bytearray(_encode(_photo(32, 24)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def test_bad_jpegs_raise_naming_the_file_before_any_decode() -> None:
    transform = MultiCropTransform()
    with pytest.raises(BadImageError, match="decompression-bomb") as info:
        EncodedImage(_jpeg_with_size(10_000, 9_000), "shard-0:key.jpg")  # 9e7 > MAX_IMAGE_PIXELS
    assert info.value.reason == "too_large" and "shard-0:key.jpg" in str(info.value)
    assert MAX_IMAGE_PIXELS < 10_000 * 9_000
    data = _encode(_photo(500, 375))
    with pytest.raises(BadImageError, match=r"key\.jpg: not a readable image") as info:
        transform.decode_views(EncodedImage(data[: len(data) // 2], "key.jpg"), _gen(0))
    assert info.value.reason == "corrupt"


def _write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return path


@pytest.mark.parametrize("skip", [True, False])
def test_shard_reader_skips_and_counts_bad_jpegs(tmp_path: Path, skip: bool) -> None:
    good = _encode(_photo(120, 90))
    shard = _write_tar(tmp_path / "train-000000.tar", {
        "train_000000000.jpg": good, "train_000000000.cls": b"1",
        "train_000000001.jpg": good[: len(good) // 2], "train_000000001.cls": b"0",
        "train_000000002.jpg": _jpeg_with_size(10_000, 9_000), "train_000000002.cls": b"0",
        "train_000000003.jpg": b"not a jpeg at all\n" * 10, "train_000000003.cls": b"0",
    })
    dataset = ShardMultiCropDataset(str(shard), "train", resampled=False, skip_bad_images=skip,
                                    num_local_crops=2, global_crop_size=64, local_crop_size=32)
    if not skip:
        with pytest.raises(BadImageError, match=r"train_000000001\.jpg"):
            list(dataset)
        return
    samples = list(dataset)
    assert [s is None for s in samples] == [False, True, True, True]
    assert dataset.num_skipped == 3
    assert samples[0].label == 1 and [tuple(c.shape) for c in samples[0].crops] == [
        (3, 64, 64)] * 2 + [(3, 32, 32)] * 2
