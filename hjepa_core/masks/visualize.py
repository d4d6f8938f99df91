"""Pictures of a multi-crop batch's masks: every crop, its context patches and target blocks.

Rows are images of the batch, columns are crops (global first). On a global crop, patches
outside the context are dimmed and each hierarchy level's target blocks are tinted and outlined
in their own colour; a local crop is framed in the colour of its role (``unmasked``,
``context`` or ``target``). Panels are composited in numpy and shown as one image on a
matplotlib ``Figure`` that pyplot does not manage; the PNG is written atomically.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hjepa_core.constants import IMAGENET_MEAN, IMAGENET_STD
from hjepa_core.masks.hierarchical import HierarchicalMasks
from hjepa_core.masks.multicrop_masking import MultiCropMasks
from hjepa_core.plots import save_figure_png

if TYPE_CHECKING:
    pass

LEVEL_COLORS = ("#e6194b", "#f58231", "#ffe119", "#911eb4", "#42d4f4", "#f032e6")
ROLE_COLORS = {"unmasked": "#9e9e9e", "context": "#3cb44b", "target": "#e6194b"}
DIM = 0.4  # brightness kept by patches outside the context
TINT = 0.25  # opacity of a target block's fill
GAP = 6  # pixels between panels


class MaskedBatch(Protocol):
    """What a picture needs of a batch (:class:`~hjepa_core.data.multicrop_dataset.MultiCropBatch`
    has it; masks sit below data, so they name the shape, not the class)."""

    @property
    def crops(self) -> Sequence[Tensor]: ...
    @property
    def masks(self) -> MultiCropMasks | None: ...
    @property
    def num_global_crops(self) -> int: ...
    @property
    def normalized(self) -> bool: ...
    @property
    def batch_size(self) -> int: ...


def _rgb(color: str) -> np.ndarray:
    return np.array([int(color[i:i + 2], 16) for i in (1, 3, 5)], dtype=np.float32) / 255.0


def crop_to_display(
    crop: Tensor,
    normalized: bool,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
) -> np.ndarray:
    """One (3, S, S) crop as an (S, S, 3) float array in [0, 1] for display.

    Args:
        crop: normalised float crop, or uint8 pixels when ``normalized`` is False.
        normalized: whether ``crop`` was normalised with ``mean`` / ``std``.
        mean: per-channel mean used for normalisation.
        std: per-channel std used for normalisation.
    """
    x = crop.detach().to("cpu", torch.float32)
    scale = torch.tensor(std).view(3, 1, 1) if normalized else torch.full((3, 1, 1), 1 / 255)
    shift = torch.tensor(mean).view(3, 1, 1) if normalized else torch.zeros(3, 1, 1)
    return (x * scale + shift).clamp(0.0, 1.0).permute(1, 2, 0).numpy()


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    if image.shape[0] == size:
        return image
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None]
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return x[0].permute(1, 2, 0).clamp(0.0, 1.0).numpy()


def _outline(panel: np.ndarray, rect: tuple[int, int, int, int], color: np.ndarray,
             width: int) -> None:
    """Draws a ``width``-pixel frame inside ``rect`` = (top, bottom, left, right), in place."""
    top, bottom, left, right = rect
    panel[top:min(top + width, bottom), left:right] = color
    panel[max(bottom - width, top):bottom, left:right] = color
    panel[top:bottom, left:min(left + width, right)] = color
    panel[top:bottom, max(right - width, left):right] = color


def block_rectangles(masks: HierarchicalMasks, sample: int) -> list[tuple[int, int, int, int, int]]:
    """(level, top, bottom, left, right) in fine-grid cells for each target block of a sample."""
    rects = []
    for level, (targets, side) in enumerate(zip(masks.targets, masks.grid_sizes, strict=True)):
        factor = 2**level
        blocks = targets[sample].cpu()
        rows, cols = blocks // side, blocks % side
        for r, c in zip(rows, cols, strict=True):
            rects.append((level, int(r.min()) * factor, (int(r.max()) + 1) * factor,
                          int(c.min()) * factor, (int(c.max()) + 1) * factor))
    return rects


def _global_panel(image: np.ndarray, masks: HierarchicalMasks, sample: int, size: int
                  ) -> np.ndarray:
    """The crop with non-context patches dimmed and the target blocks of every level drawn."""
    fine = masks.grid_sizes[0]
    in_context = torch.zeros(fine * fine, dtype=torch.bool)
    in_context[masks.context[sample].cpu()] = True
    cell = image.shape[0] // fine
    keep = np.kron(in_context.view(fine, fine).numpy(), np.ones((cell, cell), dtype=bool))
    panel = image.copy()
    panel[~keep] *= DIM
    panel = _resize(panel, size).copy()
    scale = size / fine
    rects = sorted(block_rectangles(masks, sample), key=lambda r: -r[0])  # coarse levels first
    for level, top, bottom, left, right in rects:
        color = _rgb(LEVEL_COLORS[level % len(LEVEL_COLORS)])
        box = (round(top * scale), round(bottom * scale), round(left * scale), round(right * scale))
        region = panel[box[0]:box[1], box[2]:box[3]]
        region *= 1.0 - TINT
        region += TINT * color
        _outline(panel, box, color, max(1, size // 100))
    return panel


def _local_panel(image: np.ndarray, role: str, size: int) -> np.ndarray:
    panel = _resize(image, size).copy()
    _outline(panel, (0, size, 0, size), _rgb(ROLE_COLORS.get(role, "#000000")),
             max(2, size // 28))
    return panel


def render_multicrop_masks(
    batch: MaskedBatch,
    path: str | os.PathLike,
    max_images: int = 4,
    mean: tuple[float, float, float] = IMAGENET_MEAN,
    std: tuple[float, float, float] = IMAGENET_STD,
    panel_size: int | None = None,
    dpi: int = 100,
) -> Path:
    """Renders the masks of the first ``max_images`` samples of ``batch`` to a PNG.

    Args:
        batch: a collated batch that carries masks (loader built with a mask generator).
        path: where to write the PNG (parent folders are created; written atomically).
        max_images: how many samples (rows) to draw.
        mean: normalisation mean of the crops (ignored for uint8 crops).
        std: normalisation std of the crops (ignored for uint8 crops).
        panel_size: side of every panel in pixels (default: the global crop size, within
            [96, 224]); local crops are scaled up to it.
        dpi: resolution of the PNG (panels are drawn one image pixel per PNG pixel).

    Returns:
        The path written.

    Raises:
        ValueError: the batch has no masks, or ``max_images`` < 1.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if batch.masks is None:
        raise ValueError("batch has no masks; build the loader with a mask_generator")
    if max_images < 1:
        raise ValueError(f"max_images must be >= 1, got {max_images}")
    masks = batch.masks
    n_rows = min(batch.batch_size, max_images)
    n_global = batch.num_global_crops
    n_cols = len(batch.crops)
    roles = tuple(masks.local_roles) + ("unmasked",) * (n_cols - n_global - masks.num_local_crops)
    size = panel_size or min(max(batch.crops[0].shape[-1], 96), 224)

    mosaic = np.ones((n_rows * (size + GAP) - GAP, n_cols * (size + GAP) - GAP, 3), np.float32)
    for row in range(n_rows):
        for col in range(n_cols):
            image = crop_to_display(batch.crops[col][row], batch.normalized, mean, std)
            if col < min(n_global, len(masks.global_masks)):
                panel = _global_panel(image, masks.global_masks[col], row, size)
            elif col < n_global:  # a global crop the generator made no masks for
                panel = _resize(image, size)
            else:
                panel = _local_panel(image, roles[col - n_global], size)
            y, x = row * (size + GAP), col * (size + GAP)
            mosaic[y:y + size, x:x + size] = panel

    title_px, legend_px = 46, 48
    height, width = mosaic.shape[0] + title_px + legend_px, mosaic.shape[1]
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    ax = fig.add_axes((0.0, legend_px / height, 1.0, mosaic.shape[0] / height))
    ax.imshow(mosaic, interpolation="nearest")
    ax.set_axis_off()
    for col in range(n_cols):
        label = f"global {col}" if col < n_global else (
            f"local {col - n_global}: {roles[col - n_global]}")
        ax.text(col * (size + GAP) + size / 2, -4, label, ha="center", va="bottom", fontsize=8)
    fig.suptitle(f"masking strategy: {masks.strategy}", fontsize=10, y=1 - 6 / height)
    legend = [Patch(facecolor="white", edgecolor="black", label="context patches"),
              Patch(facecolor="black", alpha=1 - DIM, label="not context (dimmed)")]
    levels = len(masks.global_masks[0].targets) if masks.global_masks else 0
    legend += [Patch(facecolor=LEVEL_COLORS[k % len(LEVEL_COLORS)], label=f"level {k} targets")
               for k in range(levels)]
    legend += [Patch(facecolor="none", edgecolor=color, linewidth=2, label=f"local: {role}")
               for role, color in ROLE_COLORS.items() if role in roles]
    fig.legend(handles=legend, loc="lower center", ncol=min(len(legend), 4), fontsize=7,
               frameon=False)
    out = Path(path)
    save_figure_png(fig, out, dpi)
    return out
