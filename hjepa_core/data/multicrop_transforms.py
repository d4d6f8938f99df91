"""Multi-crop transforms (Caron et al., 2020 "SwAV"; Oquab et al., 2023 "DINOv2").

A multi-crop transform turns one image into ``num_global_crops`` large views and
``num_local_crops`` small ones. The CPU part (:meth:`MultiCropTransform.sample_views`) only
crops, resizes and flips, and records each crop's geometry (its box in source-image pixels and
whether it was flipped) so that the model can place tokens of different crops in one shared
coordinate frame. Colour work is batched on tensors by :class:`MultiCropPhotometric`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from hjepa_core.constants import (
    GLOBAL_CROP_SCALE,
    GLOBAL_CROP_SIZE,
    LOCAL_CROP_SCALE,
    LOCAL_CROP_SIZE,
    NUM_GLOBAL_CROPS,
    NUM_LOCAL_CROPS,
)
from hjepa_core.data.images import DECODE_SCALES, EncodedImage, pil_to_tensor, to_rgb
from hjepa_core.data.photometric import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentPolicy,
    BatchPhotometric,
)
from hjepa_core.utils import as_pair


@dataclass(frozen=True)
class CropGeometry:
    """Where a crop came from.

    Attributes:
        box: (left, top, right, bottom) in source-image pixels; the crop is
            ``source.crop(box).resize(size, BILINEAR)`` (to within one grey level), mirrored
            when ``flipped`` (from a reduced JPEG decode, :meth:`MultiCropTransform.decode_views`,
            the same to a PSNR above 28 dB; its box edges may move by half a decoded pixel).
        flipped: whether the crop was mirrored left-right after resizing.
        source_size: (width, height) of the source image.
    """

    box: tuple[int, int, int, int]
    flipped: bool
    source_size: tuple[int, int]

    def normalized_box(self) -> tuple[float, float, float, float]:
        """The box in [0, 1] source-frame coordinates (x0, y0, x1, y1)."""
        w, h = self.source_size
        x0, y0, x1, y1 = self.box
        return x0 / w, y0 / h, x1 / w, y1 / h


@dataclass
class MultiCropViews:
    """The CPU output for one image: uint8 (3, S, S) crops (channels-last memory), global
    first, and their geometry."""

    crops: list[Tensor]
    geometry: list[CropGeometry]
    num_global_crops: int


CROP_ATTEMPTS = 10  # RandomResizedCrop's tries before its centre-crop fallback


def sample_resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator | None = None,
    attempts: int = CROP_ATTEMPTS,
) -> tuple[int, int, int, int]:
    """Samples a RandomResizedCrop box (Szegedy et al., 2015), as torchvision does.

    All attempts are drawn at once; the first that fits is used, else a centre crop with the
    ratio clamped to ``ratio``.
    """
    draws = torch.rand(attempts, 4, generator=generator, dtype=torch.float64).tolist()
    return resized_crop_box(width, height, scale, ratio, draws)


def resized_crop_box(
    width: int,
    height: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    draws: Sequence[Sequence[float]],
) -> tuple[int, int, int, int]:
    """:func:`sample_resized_crop_box` from given uniform draws: one (area, log-ratio, x, y)
    row per attempt (several crops' draws then come from one RNG call)."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for a_draw, r_draw, x_draw, y_draw in draws:
        target_area = area * (scale[0] + (scale[1] - scale[0]) * a_draw)
        aspect = math.exp(log_lo + (log_hi - log_lo) * r_draw)
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(x_draw * (width - w + 1))
            top = int(y_draw * (height - h + 1))
            return left, top, left + w, top + h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


class MultiCropPhotometric:
    """Batched photometric augmentation for a multi-crop batch: one policy per crop type."""

    def __init__(
        self,
        global_policy: AugmentPolicy,
        local_policy: AugmentPolicy,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        self.global_aug = BatchPhotometric(global_policy, mean, std)
        self.local_aug = BatchPhotometric(local_policy, mean, std)

    def __call__(
        self, crops: Sequence[Tensor], num_global_crops: int, generator: torch.Generator | None = None
    ) -> list[Tensor]:
        """Augments a list of uint8 (B, 3, S, S) crop batches; crops of one type in one call."""
        out: list[Tensor] = []
        for group, aug in ((crops[:num_global_crops], self.global_aug),
                           (crops[num_global_crops:], self.local_aug)):
            if not group:
                continue
            batch = group[0].shape[0]
            out.extend(aug(torch.cat(list(group)), generator).split(batch))
        return out


class MultiCropTransform:
    """Turns one image into global and local crops with recorded geometry.

    Args follow the user's multi-crop document: crop counts, sizes, RandomResizedCrop scale
    ranges and per-crop-type colour-jitter strength. ``global_policy`` / ``local_policy``
    replace the whole photometric policy of a crop type (blur, grayscale, solarise ...).

    Calling the transform on a PIL image returns the spec's list of normalised float crops
    ``[global_0, ..., local_n]``; the data loader instead calls :meth:`sample_views` in its
    workers and applies :attr:`photometric` to whole batches.
    """

    def __init__(
        self,
        num_global_crops: int = NUM_GLOBAL_CROPS,
        num_local_crops: int = NUM_LOCAL_CROPS,
        global_crop_size: int = GLOBAL_CROP_SIZE,
        local_crop_size: int = LOCAL_CROP_SIZE,
        global_crop_scale: tuple[float, float] = GLOBAL_CROP_SCALE,
        local_crop_scale: tuple[float, float] = LOCAL_CROP_SCALE,
        global_color_jitter: float = 0.4,
        local_color_jitter: float = 0.4,
        flip_prob: float = 0.5,
        aspect_ratio: tuple[float, float] = (3 / 4, 4 / 3),
        global_policy: AugmentPolicy | None = None,
        local_policy: AugmentPolicy | None = None,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        if num_global_crops < 1:
            raise ValueError(f"num_global_crops must be >= 1, got {num_global_crops}")
        if num_local_crops < 0:
            raise ValueError(f"num_local_crops must be >= 0, got {num_local_crops}")
        if global_crop_size < 1 or local_crop_size < 1:
            raise ValueError("global_crop_size and local_crop_size must be positive")
        if local_crop_size > global_crop_size:
            raise ValueError(
                f"local_crop_size ({local_crop_size}) must not exceed global_crop_size "
                f"({global_crop_size})"
            )
        for name, rng in (("global_crop_scale", global_crop_scale),
                          ("local_crop_scale", local_crop_scale)):
            if not 0.0 < rng[0] <= rng[1] <= 1.0:
                raise ValueError(f"{name} must satisfy 0 < low <= high <= 1, got {tuple(rng)}")
        if not 0.0 <= flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        self.num_global_crops = num_global_crops
        self.num_local_crops = num_local_crops
        self.global_crop_size = global_crop_size
        self.local_crop_size = local_crop_size
        self.global_crop_scale = as_pair(global_crop_scale)
        self.local_crop_scale = as_pair(local_crop_scale)
        self.flip_prob = flip_prob
        self.aspect_ratio = as_pair(aspect_ratio)
        self.photometric = MultiCropPhotometric(
            global_policy or AugmentPolicy(color_jitter=global_color_jitter),
            local_policy or AugmentPolicy(color_jitter=local_color_jitter),
            mean,
            std,
        )

    def current_num_local_crops(self) -> int:
        """Local crops per image right now (constant here; scheduled in the adaptive variant)."""
        return self.num_local_crops

    def plan_views(self, width: int, height: int,
                   generator: torch.Generator | None = None) -> list[tuple[int, CropGeometry]]:
        """Each crop's output size and geometry for a ``width`` x ``height`` source, global
        first; drawn before any pixel is decoded, so the decode can fit the crops."""
        plan = [(self.global_crop_size, self.global_crop_scale)] * self.num_global_crops
        plan += [(self.local_crop_size, self.local_crop_scale)] * self.current_num_local_crops()
        # One RNG call per image: per crop, CROP_ATTEMPTS box draws and a flip draw.
        draws = torch.rand(len(plan), CROP_ATTEMPTS + 1, 4, generator=generator,
                           dtype=torch.float64).tolist()
        views = []
        for (size, scale), crop_draws in zip(plan, draws, strict=True):
            box = resized_crop_box(width, height, scale, self.aspect_ratio, crop_draws[:-1])
            flipped = crop_draws[-1][0] < self.flip_prob
            views.append((size, CropGeometry(box, flipped, (width, height))))
        return views

    @staticmethod
    def max_decode_scale(plan: Sequence[tuple[int, CropGeometry]]) -> int:
        """The largest decode downscale (1, 2, 4 or 8) at which no crop of ``plan`` is
        upsampled: every box keeps at least its output size in pixels on both sides."""
        smallest = min(min(g.box[2] - g.box[0], g.box[3] - g.box[1]) / size for size, g in plan)
        return next((s for s in DECODE_SCALES if s <= smallest), 1)

    @staticmethod
    def render_views(source: Tensor, plan: Sequence[tuple[int, CropGeometry]],
                     scale: int = 1) -> list[Tensor]:
        """Cuts, resizes and flips the crops of ``plan`` out of a uint8 (1, 3, H, W)
        channels-last ``source`` decoded at 1/``scale`` of the size the plan was drawn for.

        Crops are uint8 (3, S, S) in channels-last memory (what the resize produces; the
        collate keeps it, so no transposing copy is made on the CPU). At ``scale > 1`` a box
        edge moves by at most half a source pixel (``scale / 2`` pixels of the full image).
        """
        height, width = source.shape[-2:]
        crops = []
        for size, geo in plan:
            left, top, right, bottom = (math.floor(v / scale + 0.5) for v in geo.box)
            right, bottom = min(max(right, left + 1), width), min(max(bottom, top + 1), height)
            region = source[:, :, top:bottom, left:right].contiguous(memory_format=torch.channels_last)
            # Antialiased bilinear on uint8: PIL's ``crop(box).resize(size, BILINEAR)`` (to
            # within a grey level) but several times faster (torch's vectorised uint8 kernel).
            pixels = F.interpolate(region, size=(size, size), mode="bilinear", antialias=True,
                                   align_corners=False)[0]
            crops.append(pixels.flip(-1) if geo.flipped else pixels)
        return crops

    def sample_views(self, image: Image.Image, generator: torch.Generator | None = None) -> MultiCropViews:
        """Crops, resizes and flips a decoded image: the CPU part of the transform (no colour
        work)."""
        image = to_rgb(image)
        plan = self.plan_views(*image.size, generator)
        return MultiCropViews(self.render_views(pil_to_tensor(image), plan), [g for _, g in plan],
                              self.num_global_crops)

    def decode_views(self, encoded: EncodedImage, generator: torch.Generator | None = None) -> MultiCropViews:
        """:meth:`sample_views` of undecoded bytes, decoded as small as the crops allow.

        The crops are planned on the header's size (same draws, same geometry as
        :meth:`sample_views` for a seed), then the image is decoded at the largest DCT
        downscale at which no crop is upsampled (:meth:`max_decode_scale`; JPEG only).

        Raises:
            BadImageError: the pixels cannot be decoded (truncated or corrupt data).
        """
        plan = self.plan_views(*encoded.size, generator)
        source, scale = encoded.decode_pixels(self.max_decode_scale(plan))
        return MultiCropViews(self.render_views(source, plan, scale), [g for _, g in plan],
                              self.num_global_crops)

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None) -> list[Tensor]:
        """Returns normalised float crops ``[global_0, ..., local_n]``, each (3, S, S)."""
        views = self.sample_views(image, generator)
        batched = self.photometric([c[None] for c in views.crops], views.num_global_crops, generator)
        return [c[0] for c in batched]


class AdaptiveMultiCropTransform(MultiCropTransform):
    """Multi-crop with a curriculum on the number of local crops.

    The count grows linearly from ``min_local_crops`` to ``max_local_crops`` over
    ``warmup_epochs``. The epoch lives in a shared-memory tensor, so :meth:`set_epoch` in the
    main process reaches DataLoader workers, persistent workers included.
    """

    def __init__(
        self,
        min_local_crops: int = 2,
        max_local_crops: int = 10,
        warmup_epochs: int = 0,
        **kwargs,
    ) -> None:
        if not 0 <= min_local_crops <= max_local_crops:
            raise ValueError(
                f"need 0 <= min_local_crops <= max_local_crops, got {min_local_crops}, {max_local_crops}"
            )
        if warmup_epochs < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {warmup_epochs}")
        kwargs["num_local_crops"] = max_local_crops
        super().__init__(**kwargs)
        self.min_local_crops = min_local_crops
        self.max_local_crops = max_local_crops
        self.warmup_epochs = warmup_epochs
        self._epoch = torch.zeros(1, dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch that decides the number of local crops (visible in all workers)."""
        self._epoch.fill_(int(epoch))

    @property
    def epoch(self) -> int:
        return int(self._epoch.item())

    def local_crops_at(self, epoch: int) -> int:
        if self.warmup_epochs == 0:
            return self.max_local_crops
        progress = min(max(epoch, 0) / self.warmup_epochs, 1.0)
        return self.min_local_crops + round(progress * (self.max_local_crops - self.min_local_crops))

    def current_num_local_crops(self) -> int:
        return self.local_crops_at(self.epoch)


class EvalTransform:
    """Single-crop evaluation transform: resize the short side, centre crop, normalise.

    Args:
        crop_size: output side; use the global crop size the encoder was trained with.
        resize_ratio: short side is resized to ``crop_size / resize_ratio`` first (0.875 as in
            ImageNet evaluation; 1.0 keeps the whole image, right for small images).
    """

    def __init__(
        self,
        crop_size: int = GLOBAL_CROP_SIZE,
        resize_ratio: float = 0.875,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        if not 0.0 < resize_ratio <= 1.0:
            raise ValueError(f"resize_ratio must be in (0, 1], got {resize_ratio}")
        self.crop_size = crop_size
        self.resize_size = round(crop_size / resize_ratio)
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def pixels(self, image: Image.Image) -> Tensor:
        """uint8 (3, S, S) centre crop."""
        image = to_rgb(image)
        w, h = image.size
        scale = self.resize_size / min(w, h)
        new_w, new_h = max(self.crop_size, round(w * scale)), max(self.crop_size, round(h * scale))
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
        left, top = (new_w - self.crop_size) // 2, (new_h - self.crop_size) // 2
        image = image.crop((left, top, left + self.crop_size, top + self.crop_size))
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)

    def __call__(self, image: Image.Image) -> Tensor:
        """Normalised float (3, S, S) tensor."""
        return (self.pixels(image).float() / 255.0 - self.mean) / self.std


MultiCropEvalTransform = EvalTransform  # the multi-crop spec's name for it (docs/multicrop_training.md)


def build_multicrop_transform(
    num_global_crops: int = NUM_GLOBAL_CROPS,
    num_local_crops: int = NUM_LOCAL_CROPS,
    global_crop_size: int = GLOBAL_CROP_SIZE,
    local_crop_size: int = LOCAL_CROP_SIZE,
    global_crop_scale: tuple[float, float] = GLOBAL_CROP_SCALE,
    local_crop_scale: tuple[float, float] = LOCAL_CROP_SCALE,
    global_color_jitter: float = 0.4,
    local_color_jitter: float = 0.4,
    adaptive: bool = False,
    min_local_crops: int = 2,
    max_local_crops: int = 10,
    warmup_epochs: int = 0,
    **kwargs,
) -> MultiCropTransform:
    """Builds a :class:`MultiCropTransform`, or the adaptive variant when ``adaptive``."""
    common = dict(
        num_global_crops=num_global_crops,
        global_crop_size=global_crop_size,
        local_crop_size=local_crop_size,
        global_crop_scale=global_crop_scale,
        local_crop_scale=local_crop_scale,
        global_color_jitter=global_color_jitter,
        local_color_jitter=local_color_jitter,
        **kwargs,
    )
    if adaptive:
        return AdaptiveMultiCropTransform(
            min_local_crops=min_local_crops,
            max_local_crops=max_local_crops,
            warmup_epochs=warmup_epochs,
            **common,
        )
    return MultiCropTransform(num_local_crops=num_local_crops, **common)
