"""Decoding any image file or PIL mode into RGB, with clear errors for files that are not images."""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image

# Pillow only errors at twice its own limit; we reject at the limit, from the header alone,
# before a huge file is decoded into a loader worker's memory.
MAX_IMAGE_PIXELS = 89_478_485


class BadImageError(ValueError):
    """A file that cannot be used as an image; the message names the file and the reason."""


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


def load_image(source: str | Path | bytes, name: str | None = None) -> Image.Image:
    """Decodes a file path or encoded bytes into an RGB PIL image.

    Raises:
        BadImageError: zero-byte, truncated or corrupt data, non-image content, or an image
            over :data:`MAX_IMAGE_PIXELS` (decompression bomb); the message names the file.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    if not data:
        raise BadImageError(f"{label}: zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise BadImageError(
                        f"{label}: {width}x{height} is over the decompression-bomb limit of "
                        f"{MAX_IMAGE_PIXELS} pixels; downscale it first"
                    )
                image.load()
                return to_rgb(image)
    except BadImageError:
        raise
    except (Image.DecompressionBombError, OSError, SyntaxError, ValueError) as exc:
        raise BadImageError(f"{label}: not a readable image ({type(exc).__name__}: {exc})") from exc
