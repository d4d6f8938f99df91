"""Batched photometric augmentation on image tensors, on whatever device the batch is on.

The CPU path of the data loader only decodes, crops and flips; everything colour-related
runs here on a whole (N, 3, H, W) uint8 batch at once with per-sample random parameters, so
it can run in the collate function (CPU workers) or on the GPU (``defer_photometric``).
The policy follows SimCLR / DINO (Chen et al., 2020; Caron et al., 2021): colour jitter with
probability 0.8, optional grayscale, Gaussian blur and solarisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from hjepa_core.constants import IMAGENET_MEAN, IMAGENET_STD

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


_CHUNK_ELEMENTS = 1 << 20  # ~4 MiB of float32 per chunk: stays in cache on the CPU


def _gray_weights(device: torch.device) -> Tensor:
    return torch.tensor(_GRAY_WEIGHTS, device=device)


def _gray(x: Tensor) -> Tensor:
    return (x * _gray_weights(x.device).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)


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


def _saturation_matrices(saturation: Tensor) -> Tensor:
    """(N,) saturation factors s -> (N, 3, 3) matrices of ``s * x + (1 - s) * gray(x)``."""
    weights = torch.tensor(_GRAY_WEIGHTS).expand(3, 3)
    s = saturation.view(-1, 1, 1)
    return s * torch.eye(3) + (1.0 - s) * weights


def _apply_color_matrix(x: Tensor, matrices: Tensor, scratch: Tensor) -> None:
    """``x = clamp(M @ x)`` per sample and pixel, in place (``scratch`` is x-shaped)."""
    n = x.shape[0]
    torch.bmm(matrices.to(x.dtype), x.view(n, 3, -1), out=scratch.view(n, 3, -1))
    torch.clamp(scratch, 0.0, 255.0, out=x)


def _chosen(mask: Tensor, rows: slice, device: torch.device) -> Tensor | None:
    """Positions, within the chunk ``rows``, of the samples selected by ``mask``."""
    picked = mask[rows]
    if not picked.any():
        return None
    return picked.nonzero().squeeze(1).to(device)


def _gaussian_blur(x: Tensor, sigma: Tensor, radius: int) -> Tensor:
    """Separable Gaussian blur with a per-sample sigma, as one grouped convolution per axis."""
    n, c, h, _ = x.shape
    radius = min(radius, (h - 1) // 2) if h > 2 else 1
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets[None, :] / sigma.to(x)[:, None]) ** 2)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)
    flat = x.reshape(1, n * c, h, -1)
    flat = F.pad(flat, (radius, radius, radius, radius), mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=n * c)
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=n * c)
    return flat.reshape(x.shape)


@dataclass
class _Params:
    """A batch's random photometric parameters (None: the operation is off)."""

    order: list[int] = field(default_factory=list)
    brightness: Tensor | None = None
    contrast: Tensor | None = None
    saturation: Tensor | None = None
    hue: Tensor | None = None
    grayscale: Tensor | None = None
    blur: Tensor | None = None
    sigma: Tensor | None = None
    blur_radius: int = 1
    solarize: Tensor | None = None


class BatchPhotometric:
    """Applies an :class:`AugmentPolicy` and normalisation to a uint8 (N, 3, H, W) batch.

    Random parameters are drawn on the CPU from ``generator`` (so results are reproducible
    for a seed whatever the device) and applied with tensor ops on the batch's device. On the
    CPU the batch is processed in cache-sized chunks, in place in the output tensor, so no
    batch-sized temporaries are allocated.
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

    def _draw(self, n: int, width: int, generator: torch.Generator | None) -> _Params:
        """All of a batch's random parameters, in a fixed draw order."""
        p = self.policy
        params = _Params()
        if p.color_jitter > 0 and p.color_jitter_prob > 0:
            s = p.color_jitter
            active = (torch.rand(n, generator=generator) < p.color_jitter_prob).float()
            # Inactive samples get identity factors, so one code path serves the whole batch.
            params.brightness = 1.0 + active * _uniform(n, -s, s, generator)
            params.contrast = 1.0 + active * _uniform(n, -s, s, generator)
            saturation = 1.0 + active * _uniform(n, -s / 2, s / 2, generator)
            hue = active * _uniform(n, -s / 4, s / 4, generator)
            params.order = torch.randperm(4, generator=generator).tolist()
            params.saturation = _saturation_matrices(saturation)
            params.hue = _hue_matrices(hue)
        if p.grayscale_prob > 0:
            params.grayscale = torch.rand(n, generator=generator) < p.grayscale_prob
        if p.blur_prob > 0:
            params.blur = torch.rand(n, generator=generator) < p.blur_prob
            sigma = _uniform(n, *p.blur_sigma, generator) * (width / 224.0)
            params.sigma = sigma.clamp_min(1e-3)
            if params.blur.any():
                widest = float(params.sigma[params.blur].max())
                params.blur_radius = max(1, math.ceil(3.0 * widest))
        if p.solarize_prob > 0:
            params.solarize = torch.rand(n, generator=generator) < p.solarize_prob
        return params

    def __call__(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"expected a uint8 (N, 3, H, W) batch, got {images.dtype} {tuple(images.shape)}"
            )
        n = images.shape[0]
        params = self._draw(n, images.shape[-1], generator)
        out = torch.empty(images.shape, dtype=torch.float32, device=images.device)
        if n == 0:
            return out
        per_image = images[0].numel()
        chunk = n if images.device.type != "cpu" else max(1, _CHUNK_ELEMENTS // per_image)
        # Work in [0, 255]: every operation is linear up to its clamp, so the 1/255 folds into
        # the normalisation at the end.
        device = images.device
        scale = torch.tensor(self.std, device=device).mul_(255.0).reciprocal_().view(1, 3, 1, 1)
        shift = torch.tensor(self.mean, device=device).mul_(255.0).view(1, 3, 1, 1)
        scratch = torch.empty((min(chunk, n), *images.shape[1:]), device=images.device)
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            x = out[start:stop]
            x.copy_(images[start:stop])
            self._apply(x, params, slice(start, stop), scratch[: stop - start])
            x.sub_(shift).mul_(scale)
        return out

    def _apply(self, x: Tensor, params: _Params, rows: slice, scratch: Tensor) -> None:
        """Augments the [0, 255] float chunk ``x`` (samples ``rows`` of the batch) in place."""
        device = x.device
        view = (x.shape[0], 1, 1, 1)
        for op in params.order:
            drawn = (params.brightness, params.contrast, params.saturation, params.hue)[op]
            assert drawn is not None  # the order is drawn together with the colour-jitter tensors
            if op == 0:
                x.mul_(drawn[rows].to(device).view(view)).clamp_(0.0, 255.0)
            elif op == 1:
                factor = drawn[rows].to(device)
                mean = x.mean(dim=(2, 3)) @ _gray_weights(device)
                x.mul_(factor.view(view)).add_(((1.0 - factor) * mean).view(view))
                x.clamp_(0.0, 255.0)
            else:
                _apply_color_matrix(x, drawn[rows].to(device), scratch)
        if params.grayscale is not None:
            idx = _chosen(params.grayscale, rows, device)
            if idx is not None:
                x[idx] = _gray(x[idx]).expand(-1, 3, -1, -1)
        if params.blur is not None and params.sigma is not None:
            idx = _chosen(params.blur, rows, device)
            if idx is not None:
                sigma = params.sigma[rows][params.blur[rows]]
                x[idx] = _gaussian_blur(x[idx], sigma, params.blur_radius)
        if params.solarize is not None:
            idx = _chosen(params.solarize, rows, device)
            if idx is not None:
                sub = x[idx]
                x[idx] = torch.where(sub >= 127.5, 255.0 - sub, sub)
