"""Batched photometric augmentation on image tensors, on whatever device the batch is on.

The CPU path of the data loader only decodes, crops and flips; everything colour-related
runs here on a whole (N, 3, H, W) uint8 batch at once with per-sample random parameters, so
it can run in the collate function (CPU workers) or on the GPU (``defer_photometric``).
The policy follows SimCLR / DINO (Chen et al., 2020; Caron et al., 2021): colour jitter with
probability 0.8, optional grayscale, Gaussian blur and solarisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)
# RGB <-> YIQ: a hue shift is a rotation of the (I, Q) chroma plane, so the whole hue jitter is
# one 3x3 matrix per sample instead of an RGB -> HSV -> RGB round trip.
_RGB_TO_YIQ = torch.tensor(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float32
)
_YIQ_TO_RGB = torch.linalg.inv(_RGB_TO_YIQ)


@dataclass(frozen=True)
class AugmentPolicy:
    """Photometric augmentation for one crop type.

    Attributes:
        color_jitter: jitter strength s: brightness and contrast in [1-s, 1+s], saturation in
            [1-s/2, 1+s/2], hue in [-s/4, s/4] (DINO's 0.4/0.4/0.2/0.1 at s=0.4). 0 disables it.
        color_jitter_prob: probability that a crop is jittered.
        grayscale_prob: probability of converting a crop to grayscale.
        blur_prob: probability of a Gaussian blur with sigma in ``blur_sigma`` (in pixels at
            224 px, scaled with the crop size).
        solarize_prob: probability of solarising (inverting pixels above 0.5).
    """

    color_jitter: float = 0.4
    color_jitter_prob: float = 0.8
    grayscale_prob: float = 0.0
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_prob: float = 0.0

    def __post_init__(self) -> None:
        for name in ("color_jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability in [0, 1], got {value}")
        if not 0.0 <= self.color_jitter <= 1.0:
            raise ValueError(f"color_jitter strength must be in [0, 1], got {self.color_jitter}")
        if not 0.0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must be 0 < low <= high, got {self.blur_sigma}")


def _gray(x: Tensor) -> Tensor:
    w = torch.tensor(_GRAY_WEIGHTS, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def _uniform(n: int, low: float, high: float, generator: torch.Generator | None) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=generator)


def _hue_matrices(hue: Tensor) -> Tensor:
    """(N,) hue shifts in turns -> (N, 3, 3) RGB-space rotation matrices."""
    angle = hue * (2 * math.pi)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.zeros(len(hue), 3, 3)
    rot[:, 0, 0] = 1.0
    rot[:, 1, 1], rot[:, 1, 2] = cos, -sin
    rot[:, 2, 1], rot[:, 2, 2] = sin, cos
    return _YIQ_TO_RGB @ rot @ _RGB_TO_YIQ


def _gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Separable Gaussian blur with a per-sample sigma, as one grouped convolution per axis."""
    n, c, h, _ = x.shape
    radius = max(1, int(math.ceil(3.0 * float(sigma.max()))))
    radius = min(radius, (h - 1) // 2) if h > 2 else 1
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets[None, :] / sigma.to(x)[:, None]) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)
    flat = x.reshape(1, n * c, h, -1)
    flat = F.pad(flat, (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=n * c)
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=n * c)
    return flat.reshape(x.shape)


class BatchPhotometric:
    """Applies an :class:`AugmentPolicy` and normalisation to a uint8 (N, 3, H, W) batch.

    Random parameters are drawn on the CPU from ``generator`` (so results are reproducible
    for a seed whatever the device) and applied with tensor ops on the batch's device.
    """

    def __init__(
        self,
        policy: AugmentPolicy,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        self.policy = policy
        self.mean = mean
        self.std = std

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected a uint8 (N, 3, H, W) batch, got {images.dtype} {tuple(images.shape)}")
        p = self.policy
        n = images.shape[0]
        device = images.device
        x = images.float().div_(255.0)
        if p.color_jitter > 0 and p.color_jitter_prob > 0:
            x = self._color_jitter(x, generator)
        if p.grayscale_prob > 0:
            chosen = (torch.rand(n, generator=generator) < p.grayscale_prob).to(device)
            x = torch.where(chosen.view(n, 1, 1, 1), _gray(x).expand_as(x), x)
        if p.blur_prob > 0:
            chosen = torch.rand(n, generator=generator) < p.blur_prob
            sigma = _uniform(n, *p.blur_sigma, generator) * (x.shape[-1] / 224.0)
            if chosen.any():
                idx = chosen.nonzero().squeeze(1).to(device)
                x[idx] = _gaussian_blur(x[idx], sigma[chosen.nonzero().squeeze(1)].clamp_min(1e-3))
        if p.solarize_prob > 0:
            chosen = (torch.rand(n, generator=generator) < p.solarize_prob).to(device)
            x = torch.where(chosen.view(n, 1, 1, 1) & (x >= 0.5), 1.0 - x, x)
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std)

    def _color_jitter(self, x: Tensor, generator: torch.Generator | None) -> Tensor:
        s = self.policy.color_jitter
        n = x.shape[0]
        active = (torch.rand(n, generator=generator) < self.policy.color_jitter_prob).float()
        # Inactive samples get identity factors, so one code path serves the whole batch.
        brightness = 1.0 + active * _uniform(n, -s, s, generator)
        contrast = 1.0 + active * _uniform(n, -s, s, generator)
        saturation = 1.0 + active * _uniform(n, -s / 2, s / 2, generator)
        hue = active * _uniform(n, -s / 4, s / 4, generator)
        order = torch.randperm(4, generator=generator).tolist()
        view = (n, 1, 1, 1)
        for op in order:
            if op == 0:
                x = x.mul_(brightness.to(x).view(view)).clamp_(0.0, 1.0)
            elif op == 1:
                mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
                x = (x - mean).mul_(contrast.to(x).view(view)).add_(mean).clamp_(0.0, 1.0)
            elif op == 2:
                gray = _gray(x)
                x = (x - gray).mul_(saturation.to(x).view(view)).add_(gray).clamp_(0.0, 1.0)
            else:
                matrices = _hue_matrices(hue).to(x)
                x = torch.einsum("nij,njhw->nihw", matrices, x).clamp_(0.0, 1.0)
        return x
