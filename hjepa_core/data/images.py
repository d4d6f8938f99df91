"""Decoding any image file or PIL mode into RGB, with clear errors for files that are not images."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# Pillow only errors at twice its own limit; we reject at the limit, from the header alone,
# before a huge file is decoded into a loader worker's memory.
MAX_IMAGE_PIXELS = 89_478_485


class BadImageError(ValueError):
    """A file that cannot be used as an image; the message names the file and the reason.

    ``reason`` is one of ``empty``, ``not_an_image``, ``corrupt``, ``too_large`` (what the
    shard writer counts skipped inputs by); ``detail`` is the message without the file name.
    """

    def __init__(self, message: str, reason: str = "corrupt", detail: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.detail = message if detail is None else detail

    def __reduce__(self) -> tuple:  # keeps reason and detail across processes
        return type(self), (str(self), self.reason, self.detail)


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Converts any PIL mode to 8-bit RGB without changing what the picture shows.

    Transparency is composited onto ``background`` (alpha is not colour information);
    16/32-bit integer and float images are rescaled to 8 bits instead of being clipped.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if mode.startswith("I;16"):
            array = array / 257.0
        elif array.size and (array.max() > 255 or array.min() < 0):
            lo, hi = float(array.min()), float(array.max())
            array = (array - lo) * (255.0 / max(hi - lo, 1e-12))
        elif mode == "F" and array.size and array.max() <= 1.0:
            array = array * 255.0
        gray = np.clip(np.rint(array), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, "L").convert("RGB")
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    elif mode in ("LA", "La", "PA", "RGBa"):
        image = image.convert("RGBA")
    if image.mode == "RGBA":
        canvas = Image.new("RGB", image.size, background)
        canvas.paste(image, mask=image.getchannel("A"))
        return canvas
    return image.convert("RGB")


def decode_image(data: bytes, name: str = "<bytes>") -> Image.Image:
    """Decodes untrusted image bytes, keeping their mode and format (no conversion).

    The size is checked against :data:`MAX_IMAGE_PIXELS` from the header alone, before the
    pixels are decoded.

    Raises:
        BadImageError: zero-byte (``empty``), not an image (``not_an_image``), truncated or
            corrupt (``corrupt``), or over the pixel limit (``too_large``); the message names
            the file.
    """
    if not data:
        raise BadImageError(f"{name}: zero-byte file", "empty", "zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise BadImageError(
                    f"{name}: {width}x{height} is over the decompression-bomb limit of "
                    f"{MAX_IMAGE_PIXELS} pixels; downscale it first",
                    "too_large", f"{width}x{height} is over {MAX_IMAGE_PIXELS} pixels",
                )
            image.load()
    except BadImageError:
        raise
    except Exception as exc:  # malformed input makes PIL's plugins raise many types
        reason, detail = "corrupt", f"{type(exc).__name__}: {exc}"
        if isinstance(exc, Image.DecompressionBombError):
            reason, detail = "too_large", str(exc)
        elif isinstance(exc, UnidentifiedImageError):
            reason, detail = "not_an_image", "not a recognised image format"
        raise BadImageError(f"{name}: not a readable image ({type(exc).__name__}: {exc})", reason, detail) from exc
    return image


def load_image(source: str | Path | bytes, name: str | None = None) -> Image.Image:
    """Decodes a file path or encoded bytes into an RGB PIL image (see :func:`decode_image`).

    Raises:
        BadImageError: zero-byte, truncated or corrupt data, non-image content, or an image
            over :data:`MAX_IMAGE_PIXELS` (decompression bomb); the message names the file.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    image = decode_image(data, label)
    try:
        return to_rgb(image)
    except (OSError, ValueError) as exc:
        raise BadImageError(f"{label}: not a readable image ({type(exc).__name__}: {exc})") from exc
