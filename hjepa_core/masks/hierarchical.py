"""Hierarchical block masks for H-JEPA on one crop's patch grid.

I-JEPA (Assran et al., 2023) predicts a few rectangular target blocks from a large context
block with the targets removed. H-JEPA adds spatial levels: level k works on the patch grid
pooled over 2^k x 2^k windows (side ``G // 2**k``), samples its own ``num_target_masks``
blocks on that grid, and its targets are the pooled target features. The context never
overlaps a target of any level.

Everything is vectorised over the batch. As in I-JEPA, one block shape is drawn per batch
(and level), positions per sample, so target counts are equal across the batch. Every context
has the same fixed size, chosen once at construction (:attr:`context_count`): a sample keeps
random cells of its context block and, when the block has too few, tops up with random cells
outside it that no target covers. So contexts do not shrink to the smallest one in the batch
(which cut a 256-sample batch's contexts on a 14x14 grid to half their mean).

Target blocks have the same cell count across a batch but not across batches (the shape is drawn
per batch). With ``pad_targets`` (for ``torch.compile``) each level's blocks are padded to the
largest block the level's scale and aspect ranges allow
(:attr:`HierarchicalMaskGenerator.target_counts`), with a validity mask: with the fixed context
size, every batch of a config then has the same tensor shapes and the compiler builds its graphs
once. Without it (eager mode) the blocks keep their drawn size: the same cells, without the
padding's ~25% of extra predictor queries and without an attention mask.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from hjepa_core.constants import GLOBAL_CROP_SIZE
from hjepa_core.utils import as_pair


class MaskConfigError(ValueError):
    """A mask parameter set that cannot produce valid masks; the message names the fix."""


@dataclass
class HierarchicalMasks:
    """Index tensors for one crop.

    Attributes:
        context: (B, K) sorted indices into the fine patch grid (row-major, side ``grid_sizes[0]``).
        targets: per level k, (B, M, T_k) indices into the level-k grid (side ``grid_sizes[k]``);
            block m of sample b is ``targets[k][b, m]``, padded (by repeating its first cell) to a
            fixed ``T_k`` where ``target_valid`` says so.
        grid_sizes: side of the patch grid at each level.
        target_valid: per level, (B, M, T_k) bool, False at padding; None: no padding.
    """

    context: Tensor
    targets: list[Tensor]
    grid_sizes: list[int]
    target_valid: list[Tensor] | None = None

    @property
    def batch_size(self) -> int:
        return self.context.shape[0]

    def to(self, device: torch.device | str) -> HierarchicalMasks:
        return HierarchicalMasks(
            self.context.to(device, non_blocking=True),
            [t.to(device, non_blocking=True) for t in self.targets],
            self.grid_sizes,
            None if self.target_valid is None else [v.to(device, non_blocking=True) for v in self.target_valid],
        )

    def split(self, size: int) -> list[HierarchicalMasks]:
        """Chunks of ``size`` samples (one per crop of a jointly drawn batch)."""
        targets = [t.split(size) for t in self.targets]
        valid = None if self.target_valid is None else [v.split(size) for v in self.target_valid]
        return [HierarchicalMasks(context, [t[i] for t in targets], self.grid_sizes,
                                  None if valid is None else [v[i] for v in valid])
                for i, context in enumerate(self.context.split(size))]

    def target_coverage(self) -> Tensor:
        """(B, G*G) bool: fine patches inside any target block of any level."""
        fine = self.grid_sizes[0]
        covered = torch.zeros(self.batch_size, fine * fine, dtype=torch.bool, device=self.context.device)
        for level, (targets, side) in enumerate(zip(self.targets, self.grid_sizes, strict=True)):
            factor = 2**level
            rows, cols = targets // side, targets % side
            offsets = torch.arange(factor, device=targets.device)
            fine_rows = (rows[..., None] * factor + offsets).flatten(-2)
            fine_cols = (cols[..., None] * factor + offsets).flatten(-2)
            fine_idx = (fine_rows[..., :, None] * fine + fine_cols[..., None, :]).flatten(1)
            covered.scatter_(1, fine_idx, True)
        return covered


def _block_shape(scale: float, aspect: float, grid: int) -> tuple[int, int]:
    area = scale * grid * grid
    h = max(1, round(math.sqrt(area * aspect)))
    w = max(1, round(math.sqrt(area / aspect)))
    return h, w


def _largest_block(scale: float, aspect: tuple[float, float], grid: int) -> int:
    """The most cells a block of scale up to ``scale`` and aspect in ``aspect`` can have.

    Both sides of :func:`_block_shape` grow with the scale, so the top scale bounds them; over
    the aspect ratio they are step functions, so their product is largest on one of the steps:
    the range's ends and every aspect where either rounded side changes are checked.
    """
    area = scale * grid * grid
    edges = [aspect[0], aspect[1]]
    for n in range(1, grid + 2):
        boundary = (n - 0.5) ** 2 / area  # round(sqrt(area * r)) steps at r = boundary
        edges += [boundary, 1.0 / boundary]  # ... and round(sqrt(area / r)) at r = 1 / boundary
    candidates = [min(max(r * f, aspect[0]), aspect[1]) for r in edges for f in (1 - 1e-9, 1 + 1e-9)]
    return max(h * w for h, w in (_block_shape(scale, r, grid) for r in candidates))


def random_subset(priority: Tensor, keep: int, generator: torch.Generator | None) -> Tensor:
    """(B, keep) sorted indices: per row, ``keep`` random cells of the highest priority.

    ``priority`` is a (B, N) bool or small-integer tensor. Cells score ``priority + U(0, 1)``, so
    the ``keep`` highest scores take every cell of the top priority class first, at random within
    a class; a per-row threshold (k-th value) selects them and ``nonzero`` lists them in index
    order (cheaper than top-k and a sort).
    """
    scores = torch.rand(priority.shape, generator=generator) + priority.float()
    if keep == 0:
        return torch.zeros(priority.shape[0], 0, dtype=torch.long)
    threshold = scores.kthvalue(priority.shape[1] - keep + 1, dim=1, keepdim=True).values
    chosen = scores >= threshold
    if int(chosen.sum()) == priority.shape[0] * keep:
        return chosen.nonzero()[:, 1].view(-1, keep)
    return scores.topk(keep, dim=1).indices.sort(dim=1).values  # a tie at a threshold


class HierarchicalMaskGenerator:
    """Samples context and per-level target blocks on a square patch grid.

    Args:
        input_size: crop side in pixels.
        patch_size: ViT patch side in pixels.
        num_hierarchies: number of levels; level k has grid side ``G // 2**k``.
        num_target_masks: target blocks per level.
        base_scale: block area range, as a fraction of the grid, at the finest level.
        aspect_ratio_range: block height/width range.
        level_scale_growth: level k's scale range is ``base_scale * growth**k`` (1.0 keeps the
            same image fraction at every level, with coarser tokens).
        context_scale: context block area range (I-JEPA: 0.85-1.0, aspect 1).
        min_context_patches: the smallest allowed :attr:`context_count`.
        min_context_fraction: the smallest allowed :attr:`context_count` as a fraction of the
            patch grid; settings that leave less context are a construction-time error.
        pad_targets: pad every level's blocks to :attr:`target_counts` cells (static shapes for
            ``torch.compile``); False keeps each batch's drawn block size (less work in eager mode).
            The cells drawn do not depend on it.
        seed: seeds the generator used when a call passes none.
    """

    max_redraws = 50
    max_shape_draws = 20
    _estimate_batches, _estimate_batch_size = 32, 32

    def __init__(
        self,
        input_size: int = GLOBAL_CROP_SIZE,
        patch_size: int = 16,
        num_hierarchies: int = 3,
        num_target_masks: int = 4,
        base_scale: tuple[float, float] = (0.05, 0.15),
        aspect_ratio_range: tuple[float, float] = (0.75, 1.5),
        level_scale_growth: float = 1.0,
        context_scale: tuple[float, float] = (0.85, 1.0),
        min_context_patches: int = 4,
        min_context_fraction: float = 0.1,
        pad_targets: bool = True,
        seed: int | None = None,
    ) -> None:
        if input_size % patch_size:
            raise MaskConfigError(
                f"crop size {input_size} is not divisible by patch_size {patch_size}; "
                "change the crop size or patch_size"
            )
        if num_hierarchies < 1 or num_target_masks < 1:
            raise MaskConfigError("num_hierarchies and num_target_masks must be >= 1")
        if not 0.0 < base_scale[0] <= base_scale[1] <= 1.0:
            raise MaskConfigError(f"base_scale must satisfy 0 < low <= high <= 1, got {base_scale}")
        if not 0.0 < aspect_ratio_range[0] <= aspect_ratio_range[1]:
            raise MaskConfigError(f"aspect_ratio_range must be 0 < low <= high, got {aspect_ratio_range}")
        if not 0.0 < context_scale[0] <= context_scale[1] <= 1.0:
            raise MaskConfigError(f"context_scale must satisfy 0 < low <= high <= 1, got {context_scale}")
        self.grid = input_size // patch_size
        self.num_hierarchies = num_hierarchies
        self.num_target_masks = num_target_masks
        self.base_scale = as_pair(base_scale)
        self.aspect_ratio_range = as_pair(aspect_ratio_range)
        self.level_scale_growth = level_scale_growth
        self.context_scale = as_pair(context_scale)
        self.min_context_patches = min_context_patches
        self.min_context_fraction = min_context_fraction
        self.pad_targets = pad_targets
        self.grid_sizes = [self.grid // 2**k for k in range(num_hierarchies)]
        if num_hierarchies > 1 and self.grid_sizes[-1] < 3:
            raise MaskConfigError(
                f"num_hierarchies={num_hierarchies} on a {self.grid}x{self.grid} patch grid makes level "
                f"{num_hierarchies - 1} a {self.grid_sizes[-1]}x{self.grid_sizes[-1]} grid, where one target "
                "cell is a whole quadrant of the crop or more; lower num_hierarchies or raise the crop size "
                "(or lower patch_size)"
            )
        if self.grid_sizes[-1] < 1:
            raise MaskConfigError(
                f"num_hierarchies={num_hierarchies} needs a patch grid of at least "
                f"{2 ** (num_hierarchies - 1)} patches per side, but crop {input_size} / patch "
                f"{patch_size} gives {self.grid}; lower num_hierarchies or raise the crop size"
            )
        self.level_scales = [
            (base_scale[0] * level_scale_growth**k, min(1.0, base_scale[1] * level_scale_growth**k))
            for k in range(num_hierarchies)
        ]
        self._check_blocks_fit()
        self.target_counts = [_largest_block(hi, self.aspect_ratio_range, side)
                              for (_, hi), side in zip(self.level_scales, self.grid_sizes, strict=True)]
        self.context_count = self._choose_context_count()
        self._generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def _choose_context_count(self) -> int:
        """The fixed context size: the median context-block size over simulated batches, capped so
        that ~95% of samples have that many cells outside every target (others are redrawn)."""
        generator = torch.Generator().manual_seed(0)
        in_block, free = [], []
        for _ in range(self._estimate_batches):
            block, uncovered = self._draw(self._estimate_batch_size, self._sample_shapes(generator), generator)[1:]
            in_block.append((block & uncovered).sum(1))
            free.append(uncovered.sum(1))
        count = min(int(torch.cat(in_block).float().median()),
                    int(torch.cat(free).float().quantile(0.05)))
        floor = max(self.min_context_patches, math.ceil(self.min_context_fraction * self.grid**2))
        if count < floor:
            raise MaskConfigError(
                f"the target blocks leave a context of about {count} of {self.grid**2} patches, fewer "
                f"than {floor} (min_context_patches={self.min_context_patches}, min_context_fraction="
                f"{self.min_context_fraction}); lower num_target_masks, base_scale or num_hierarchies, "
                "or use a larger crop"
            )
        return count

    def _check_blocks_fit(self) -> None:
        lo_r, hi_r = self.aspect_ratio_range
        for k, (side, (_, hi_s)) in enumerate(zip(self.grid_sizes, self.level_scales, strict=True)):
            tallest = _block_shape(hi_s, hi_r, side)[0]
            widest = _block_shape(hi_s, lo_r, side)[1]
            if tallest > side or widest > side:
                raise MaskConfigError(
                    f"level {k}: a block of scale {hi_s:.3f} with aspect range {self.aspect_ratio_range} "
                    f"is up to {tallest}x{widest} cells but the level grid is {side}x{side}; "
                    "lower base_scale (or level_scale_growth) or narrow aspect_ratio_range"
                )

    def _sample_shape(self, scale: tuple[float, float], side: int, generator: torch.Generator | None,
                      aspect: tuple[float, float]) -> tuple[int, int]:
        s_draw, r_draw = torch.rand(2, generator=generator).tolist()
        s = scale[0] + (scale[1] - scale[0]) * s_draw
        log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
        r = math.exp(log_lo + (log_hi - log_lo) * r_draw)
        return _block_shape(s, r, side)

    @staticmethod
    def _place(batch: int, count: int, shape: tuple[int, int], side: int,
               generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
        """Random top-left corners (B, count) for blocks of ``shape`` on a ``side`` grid."""
        h, w = shape
        top = torch.randint(0, side - h + 1, (batch, count), generator=generator)
        left = torch.randint(0, side - w + 1, (batch, count), generator=generator)
        return top, left

    @staticmethod
    def _block_indices(top: Tensor, left: Tensor, shape: tuple[int, int], side: int) -> Tensor:
        h, w = shape
        dr = torch.arange(h).repeat_interleave(w)
        dc = torch.arange(w).repeat(h)
        return (top[..., None] + dr) * side + left[..., None] + dc

    @staticmethod
    def _block_cover(top: Tensor, left: Tensor, shape: tuple[int, int], factor: int, fine: int) -> Tensor:
        """(B, fine, fine) bool: fine cells covered by any of the (B, M) blocks."""
        h, w = shape
        cells = torch.arange(fine)
        in_rows = (cells >= top[..., None] * factor) & (cells < (top[..., None] + h) * factor)
        in_cols = (cells >= left[..., None] * factor) & (cells < (left[..., None] + w) * factor)
        # A cell is covered when some block spans both its row and its column: count such
        # blocks with one batched (fine x M) @ (M x fine) product.
        return torch.bmm(in_rows.transpose(1, 2).float(), in_cols.float()) > 0

    def _sample_shapes(self, generator: torch.Generator | None) -> tuple[list[tuple[int, int]], tuple[int, int]]:
        """One batch's target-block shape per level and its context-block shape."""
        shapes = [
            self._sample_shape(scale, side, generator, self.aspect_ratio_range)
            for scale, side in zip(self.level_scales, self.grid_sizes, strict=True)
        ]
        return shapes, self._sample_shape(self.context_scale, self.grid, generator, (1.0, 1.0))

    def _draw(self, n: int, shapes: tuple[list[tuple[int, int]], tuple[int, int]],
              generator: torch.Generator | None) -> tuple[list[tuple[Tensor, Tensor]], Tensor, Tensor]:
        """Block corners per level, and (n, G*G) masks of the context block and of the cells no
        target covers."""
        fine = self.grid
        target_shapes, context_shape = shapes
        corners = [self._place(n, self.num_target_masks, shape, side, generator)
                   for shape, side in zip(target_shapes, self.grid_sizes, strict=True)]
        covered = torch.zeros(n, fine, fine, dtype=torch.bool)
        for k, ((top, left), shape) in enumerate(zip(corners, target_shapes, strict=True)):
            covered |= self._block_cover(top, left, shape, 2**k, fine)
        c_top, c_left = self._place(n, 1, context_shape, fine, generator)
        block = self._block_cover(c_top, c_left, context_shape, 1, fine)
        return corners, block.flatten(1), ~covered.flatten(1)

    def _place_leaving_context(
        self, n: int, shapes: tuple[list[tuple[int, int]], tuple[int, int]], generator: torch.Generator | None,
    ) -> tuple[list[tuple[Tensor, Tensor]], Tensor, Tensor] | None:
        """Blocks of ``shapes`` for ``n`` samples, redrawing the positions of samples whose targets
        leave fewer than :attr:`context_count` cells; None when some still do after the redraws."""
        corners, block, free = self._draw(n, shapes, generator)
        for _ in range(self.max_redraws):
            short = free.sum(1) < self.context_count
            if not short.any():
                return corners, block, free
            redo = short.nonzero().squeeze(1)
            new_corners, block[redo], free[redo] = self._draw(len(redo), shapes, generator)
            for (top, left), (n_top, n_left) in zip(corners, new_corners, strict=True):
                top[redo], left[redo] = n_top, n_left
        return None

    def __call__(self, batch_size: int, generator: torch.Generator | None = None) -> HierarchicalMasks:
        generator = generator if generator is not None else self._generator
        # A batch's block shapes can be too large to leave the context for every sample (rare, the
        # largest scales at both aspect extremes): then the batch draws new shapes.
        for _ in range(self.max_shape_draws):
            shapes = self._sample_shapes(generator)
            placed = self._place_leaving_context(batch_size, shapes, generator)
            if placed is not None:
                break
        else:
            raise MaskConfigError(
                f"could not place target blocks leaving >= {self.context_count} context patches in "
                f"{self.max_shape_draws} x {self.max_redraws} tries; lower num_target_masks or base_scale"
            )
        corners, block, free = placed
        # Context-block cells first, then uncovered cells outside the block; never a target cell.
        priority = free.to(torch.int8) * (1 + block.to(torch.int8))
        context_idx = random_subset(priority, self.context_count, generator)
        blocks = [self._block_indices(top, left, shape, side)
                  for (top, left), shape, side in zip(corners, shapes[0], self.grid_sizes, strict=True)]
        if not self.pad_targets:
            return HierarchicalMasks(context_idx, blocks, list(self.grid_sizes))
        targets, valid = [], []
        for cells, count in zip(blocks, self.target_counts, strict=True):
            pad = count - cells.shape[-1]
            targets.append(torch.cat([cells, cells[..., :1].expand(-1, -1, pad)], dim=-1))
            valid.append((torch.arange(count) < cells.shape[-1]).expand(batch_size, self.num_target_masks, -1))
        return HierarchicalMasks(context_idx, targets, list(self.grid_sizes), valid)
