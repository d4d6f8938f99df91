"""Decoding any image file or PIL mode into RGB, with clear errors for files that are not images."""

from __future__ import annotations

import functools
import io
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

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


def _unreadable(name: str, exc: Exception) -> BadImageError:
    """The :class:`BadImageError` for an exception raised while opening or decoding ``name``."""
    reason, detail = "corrupt", f"{type(exc).__name__}: {exc}"
    if isinstance(exc, Image.DecompressionBombError):
        reason, detail = "too_large", str(exc)
    elif isinstance(exc, UnidentifiedImageError):
        reason, detail = "not_an_image", "not a recognised image format"
    return BadImageError(f"{name}: not a readable image ({type(exc).__name__}: {exc})", reason, detail)


def open_image(data: bytes, name: str = "<bytes>") -> Image.Image:
    """Opens untrusted image bytes from the header alone: size and format, no pixels yet.

    The size is checked against :data:`MAX_IMAGE_PIXELS` here, so a decompression bomb is
    rejected before any pixel is decoded (and before a reduced-size decode is chosen).

    Raises:
        BadImageError: zero-byte (``empty``), not an image (``not_an_image``), a corrupt
            header (``corrupt``), or over the pixel limit (``too_large``); the message names
            the file.
    """
    if not data:
        raise BadImageError(f"{name}: zero-byte file", "empty", "zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Exception as exc:  # malformed input makes PIL's plugins raise many types
        raise _unreadable(name, exc) from exc
    width, height = image.size
    if width * height > MAX_IMAGE_PIXELS:
        raise BadImageError(
            f"{name}: {width}x{height} is over the decompression-bomb limit of "
            f"{MAX_IMAGE_PIXELS} pixels; downscale it first",
            "too_large", f"{width}x{height} is over {MAX_IMAGE_PIXELS} pixels",
        )
    return image


def _load(image: Image.Image, name: str) -> Image.Image:
    """Decodes the pixels of an opened image; BadImageError (naming the file) if they are bad."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
    except Exception as exc:  # truncated or corrupt data: many exception types
        raise _unreadable(name, exc) from exc
    return image


def decode_image(data: bytes, name: str = "<bytes>") -> Image.Image:
    """Decodes untrusted image bytes, keeping their mode and format (no conversion).

    The size is checked against :data:`MAX_IMAGE_PIXELS` from the header alone, before the
    pixels are decoded (:func:`open_image`).

    Raises:
        BadImageError: zero-byte (``empty``), not an image (``not_an_image``), truncated or
            corrupt (``corrupt``), or over the pixel limit (``too_large``); the message names
            the file.
    """
    return _load(open_image(data, name), name)


def pil_to_tensor(image: Image.Image) -> Tensor:
    """An RGB PIL image as a uint8 (1, 3, H, W) tensor in channels-last memory (one copy)."""
    with warnings.catch_warnings():
        # PIL hands numpy a read-only buffer; the tensor is only ever read.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        pixels = torch.from_numpy(np.asarray(image))
    return pixels.permute(2, 0, 1)[None]


DECODE_SCALES = (8, 4, 2, 1)  # the DCT scalings libjpeg offers (1/8 ... 1/1), largest first


class EncodedImage:
    """Untrusted image bytes, opened from the header alone and decoded on demand.

    Opening checks the size against :data:`MAX_IMAGE_PIXELS` (:func:`open_image`), so the
    caller knows ``size`` (and can pick a reduced decode) before any pixel is decoded.

    Raises:
        BadImageError: as :func:`open_image`.
    """

    def __init__(self, data: bytes, name: str = "<bytes>") -> None:
        self.data = data
        self.name = name
        self._image = open_image(data, name)

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) from the header."""
        return self._image.size

    def decode_pixels(self, max_scale: int = 1) -> tuple[Tensor, int]:
        """Decodes to RGB pixels, downscaled by up to ``max_scale`` where that is cheaper.

        A JPEG is decoded at 1/2, 1/4 or 1/8 of its size (libjpeg's DCT scaling: the high
        frequencies are never decoded, instead of decoded and averaged away) when
        ``max_scale`` allows it; the caller guarantees that nothing it crops is undersampled
        at that scale. A full-size RGB or grayscale JPEG is decoded by
        ``torchvision.io.decode_jpeg`` (the same libjpeg-turbo, identical pixels, ~1.5x
        faster than PIL plus the copy to an array; PIL where torchvision no longer has it);
        anything else by PIL and :func:`to_rgb`. Call it once: PIL's reduced decode changes
        the opened image.

        Returns:
            ``(pixels, scale)``: uint8 (1, 3, H, W) channels-last pixels of the image
            downscaled by ``scale`` (each side ``ceil(side / scale)``), and that scale.

        Raises:
            BadImageError: truncated or corrupt data (``corrupt``), naming the file.
        """
        image, (width, height) = self._image, self._image.size
        scale = 1
        if image.format == "JPEG" and image.mode in ("RGB", "L"):
            scale = next(s for s in DECODE_SCALES if s <= max_scale and s <= min(width, height))
            if scale == 1 and (pixels := self._decode_jpeg()) is not None:
                return pixels, 1
            drafted = image.draft("RGB", (width // scale, height // scale))
            scale = round(width / drafted[1][2]) if drafted else 1  # box: (0, 0, width / scale, ..)
        return pil_to_tensor(_rgb(_load(image, self.name), self.name)), scale

    def _decode_jpeg(self) -> Tensor | None:
        """torchvision's decode; None where this torchvision no longer ships it."""
        decode = _torchvision_decode_jpeg()
        if decode is None:
            return None
        try:
            with warnings.catch_warnings():
                # torchvision 0.29 deprecates its image decoders (in favour of TorchCodec);
                # without them the PIL path below takes over.
                warnings.simplefilter("ignore", DeprecationWarning)
                pixels = decode(torch.frombuffer(bytearray(self.data), dtype=torch.uint8))
        except RuntimeError as exc:  # torchvision's type for every libjpeg error
            raise _unreadable(self.name, exc) from exc
        return pixels[None]


@functools.cache
def _torchvision_decode_jpeg() -> Callable[[Tensor], Tensor] | None:
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        return None
    return functools.partial(decode_jpeg, mode=ImageReadMode.RGB)


def _rgb(image: Image.Image, name: str) -> Image.Image:
    try:
        return to_rgb(image)
    except (OSError, ValueError) as exc:
        raise BadImageError(f"{name}: not a readable image ({type(exc).__name__}: {exc})") from exc


def load_image(source: str | Path | bytes, name: str | None = None) -> Image.Image:
    """Decodes a file path or encoded bytes into an RGB PIL image (see :func:`decode_image`).

    Raises:
        BadImageError: zero-byte, truncated or corrupt data, non-image content, or an image
            over :data:`MAX_IMAGE_PIXELS` (decompression bomb); the message names the file.
    """
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    data = source if isinstance(source, bytes) else Path(source).read_bytes()
    return _rgb(decode_image(data, label), label)
