"""The H-JEPA predictor: a narrow transformer that places tokens in the source-image frame.

Every token (context or query) is positioned by where its patch lies in the *source* image:
centre (x, y) in [0, 1] and extent (w, h), from the crop geometry the transforms record. That
shared frame is what lets tokens of a local crop and a global crop, or a coarse level-k cell
and a fine patch, sit in one sequence. Queries are mask tokens plus a level embedding; each
hierarchy level has its own output head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from hjepa_core.models.layers import Block, init_weights, rescale_residual_branches, sincos_embed


def source_positions(boxes: Tensor, flips: Tensor, side: int, cell: int = 1) -> Tensor:
    """Source-frame position of every cell of a crop's patch grid.

    Args:
        boxes: (N, 4) crop boxes (x0, y0, x1, y1) in [0, 1] source coordinates.
        flips: (N,) whether each crop was mirrored after cropping.
        side: the crop's fine patch-grid side.
        cell: cells of ``cell x cell`` fine patches (a level-k grid uses ``2**k``).
    Returns:
        (N, (side // cell)**2, 4): centre x, centre y, width, height per cell, row-major.
    """
    coarse = side // cell
    centers = (torch.arange(coarse, device=boxes.device, dtype=torch.float32) + 0.5) * cell / side
    u = centers.view(1, 1, coarse).expand(len(boxes), coarse, coarse)
    u = torch.where(flips.view(-1, 1, 1).bool(), 1.0 - u, u)
    v = centers.view(1, coarse, 1).expand(len(boxes), coarse, coarse)
    x0, y0, x1, y1 = (boxes[:, i].float().view(-1, 1, 1) for i in range(4))
    width, height = x1 - x0, y1 - y0
    x = x0 + u * width
    y = y0 + v * height
    w = (width * cell / side).expand_as(x)
    h = (height * cell / side).expand_as(x)
    return torch.stack([x, y, w, h], dim=-1).flatten(1, 2)


class HierarchicalPredictor(nn.Module):
    """Predicts target-encoder features at query positions from context tokens.

    Args:
        encoder_dim: encoder token width (input and output of the predictor).
        embed_dim, depth, num_heads: predictor width and size (narrower than the encoder).
        num_levels: hierarchy levels; one output head and one query embedding each.
        pos_scale: source coordinates are multiplied by this before the sine-cosine table
            (roughly the global crop's patch-grid side, so frequencies match a patch grid).
    """

    def __init__(
        self,
        encoder_dim: int,
        embed_dim: int = 384,
        depth: int = 6,
        num_heads: int = 6,
        num_levels: int = 3,
        mlp_ratio: float = 4.0,
        pos_scale: float = 14.0,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.pos_scale = pos_scale
        self.grad_checkpointing = grad_checkpointing
        self.embed = nn.Linear(encoder_dim, embed_dim)
        self.extent_embed = nn.Linear(2, embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.level_embed = nn.Parameter(torch.zeros(num_levels, embed_dim))
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.heads = nn.ModuleList(nn.Linear(embed_dim, encoder_dim) for _ in range(num_levels))
        self.apply(init_weights)
        rescale_residual_branches(self.blocks)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.level_embed, std=0.02)

    def position_embedding(self, positions: Tensor) -> Tensor:
        """(N, T, 4) source positions -> (N, T, embed_dim)."""
        table = sincos_embed(positions[..., :2] * self.pos_scale, self.embed_dim)
        extent = self.extent_embed(torch.log(positions[..., 2:].clamp_min(1e-4)))
        return table.to(extent.dtype) + extent

    def forward(
        self,
        context: Tensor,
        context_positions: Tensor,
        queries: Sequence[tuple[Tensor, int]],
        key_valid: Tensor | None = None,
    ) -> list[Tensor]:
        """Runs context and all query groups through the predictor in one sequence.

        Args:
            context: (N, Tc, encoder_dim) context tokens.
            context_positions: (N, Tc, 4) their source positions.
            queries: (positions (N, Tq, 4), level) per query group; queries carry no content.
            key_valid: optional (N, Tc + sum Tq) bool, False at padding tokens (fixed-size
                target blocks): no token attends to them, so they change no real prediction.
        Returns:
            One (N, Tq, encoder_dim) prediction per query group, through that level's head.
        """
        parts = [self.embed(context) + self.position_embedding(context_positions)]
        for positions, level in queries:
            token = self.mask_token + self.level_embed[level]
            parts.append(token + self.position_embedding(positions))
        x = torch.cat(parts, dim=1)
        mask = None if key_valid is None else key_valid[:, None, None, :]
        recompute = self.grad_checkpointing and self.training
        *blocks, last = self.blocks
        assert isinstance(last, Block)
        for block in blocks:
            x = checkpoint(block, x, None, mask, use_reentrant=False) if recompute else block(x, None, mask)
        # Only the queries' outputs are read: the last block skips the context rows' own outputs.
        start = context.shape[1]
        x = (checkpoint(last.forward_rows_from, x, start, mask, use_reentrant=False) if recompute
             else last.forward_rows_from(x, start, mask))
        x = self.norm(x)
        sizes = [p.shape[1] for p, _ in queries]
        outputs = x.split(sizes, dim=1)
        return [self.heads[level](out) for out, (_, level) in zip(outputs, queries, strict=True)]
