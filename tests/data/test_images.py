"""Decoding images of any PIL mode to RGB, and clear errors for files that are not images."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hjepa_core.data.images import MAX_IMAGE_PIXELS, BadImageError, load_image, to_rgb

MODES = ("L", "RGB", "RGBA", "P", "I;16", "CMYK", "1", "LA", "F", "I", "PA")


def _image_in_mode(mode: str, size: tuple[int, int] = (9, 7)) -> Image.Image:
    """A small image in ``mode`` with varied pixel values (P has a transparent index)."""
    w, h = size
    ramp = (np.arange(w * h).reshape(h, w) * 5 % 256).astype(np.uint8)
    if mode == "I;16":
        return Image.fromarray(ramp.astype(np.uint16) * 257)
    if mode == "I":
        return Image.fromarray(ramp.astype(np.int32) * 1000)
    if mode == "F":
        return Image.fromarray(ramp.astype(np.float32) / 255.0)
    if mode == "P":
        image = Image.fromarray(ramp % 16).convert("L").convert("P")
        image.info["transparency"] = 0
        return image
    rgb = Image.fromarray(np.stack([ramp, ramp[::-1], 255 - ramp], axis=-1), "RGB")
    return rgb.convert(mode)


@pytest.mark.parametrize("mode", MODES)
def test_to_rgb_any_mode(mode: str) -> None:
    image = _image_in_mode(mode)
    out = to_rgb(image)
    assert out.mode == "RGB"
    assert out.size == image.size
    assert np.asarray(out).dtype == np.uint8


def test_to_rgb_composites_transparency_on_background() -> None:
    rgba = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    rgba.putpixel((0, 0), (10, 20, 30, 255))
    out = np.asarray(to_rgb(rgba))
    assert tuple(out[1, 1]) == (255, 255, 255)
    assert tuple(out[0, 0]) == (10, 20, 30)
    la = Image.new("LA", (2, 2), (50, 0))
    assert tuple(np.asarray(to_rgb(la, background=(0, 0, 0)))[0, 0]) == (0, 0, 0)


def test_to_rgb_palette_transparency() -> None:
    image = _image_in_mode("P")
    out = np.asarray(to_rgb(image))
    index = np.asarray(image)
    assert (out[index == 0] == 255).all()  # the transparent index shows the background


def test_to_rgb_rescales_wide_integer_and_float_images() -> None:
    i16 = Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16))
    assert np.asarray(to_rgb(i16))[0, :, 0].tolist() == [0, 100, 255]
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(to_rgb(unit))[0, :, 0].tolist() == [0, 128, 255]
    wide = Image.fromarray(np.array([[-1000.0, 0.0, 1000.0]], dtype=np.float32))
    assert np.asarray(to_rgb(wide))[0, :, 0].tolist() == [0, 128, 255]
    bilevel = Image.new("1", (2, 1), 0)
    bilevel.putpixel((1, 0), 1)
    assert np.asarray(to_rgb(bilevel))[0, :, 0].tolist() == [0, 255]


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("L", "PNG"), ("RGB", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"), ("I;16", "PNG"),
     ("CMYK", "JPEG"), ("1", "BMP"), ("LA", "PNG"), ("F", "TIFF"), ("RGB", "WEBP")],
)
def test_load_image_from_files_of_any_mode(tmp_path: Path, mode: str, fmt: str) -> None:
    path = tmp_path / f"img.{fmt.lower()}"
    path.write_bytes(_encode(_image_in_mode(mode), fmt))
    image = load_image(path)
    assert image.mode == "RGB"
    assert image.size == (9, 7)


def test_load_image_from_bytes() -> None:
    data = _encode(_image_in_mode("RGB"), "PNG")
    assert load_image(data).size == (9, 7)
    with pytest.raises(BadImageError, match="shard-0/key"):
        load_image(b"not an image", name="shard-0/key")


def _png_header(width: int, height: int) -> bytes:
    """A PNG with only a valid IHDR (no pixel data): enough for a size check."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk)) + struct.pack(">I", 0) + b"IEND"
            + struct.pack(">I", zlib.crc32(b"IEND")))


def _truncated_jpeg() -> bytes:
    data = _encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3),
                                                                     dtype=np.uint8)), "JPEG")
    return data[: len(data) // 2]


@pytest.mark.parametrize(
    ("name", "data", "reason"),
    [
        ("empty.jpg", b"", "zero-byte"),
        ("text.jpg", b"this is a text file, not a JPEG\n" * 4, "not a readable image"),
        ("random.png", bytes(np.random.default_rng(1).integers(0, 256, 500, dtype=np.uint8)),
         "not a readable image"),
        ("truncated.jpg", _truncated_jpeg(), "not a readable image"),
        ("truncated.png", _encode(_image_in_mode("RGB", (40, 40)), "PNG")[:60],
         "not a readable image"),
        ("corrupt.png", _encode(_image_in_mode("RGB"), "PNG")[:16] + b"\x00" * 80,
         "not a readable image"),
        ("bomb.png", _png_header(10_000, 10_000), "decompression-bomb limit"),
        ("huge.png", _png_header(20_000, 20_000), "not a readable image"),
    ],
)
def test_bad_files_raise_bad_image_error_naming_the_file(
    tmp_path: Path, name: str, data: bytes, reason: str
) -> None:
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(BadImageError, match=reason) as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_bomb_limit_is_checked_before_decoding() -> None:
    side = int(MAX_IMAGE_PIXELS**0.5) + 1
    with pytest.raises(BadImageError, match=f"{side}x{side}"):
        load_image(_png_header(side, side), name="big.png")


def test_bad_image_error_is_a_value_error() -> None:
    assert issubclass(BadImageError, ValueError)
