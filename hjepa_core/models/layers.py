"""Transformer layers: timm's patch embedding, attention, MLP, stochastic depth and RoPE, in our block.

The modules come from ``timm.layers`` with the parameter names our checkpoints already use
(``tests/models/test_layers.py`` pins the state-dict keys and the computation). Attention runs
through ``F.scaled_dot_product_attention`` (timm's fused path) so the flash / memory-efficient
kernels are used where the device has them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import AttentionRope, DropPath, Mlp, RotaryEmbeddingCat
from torch import Tensor, nn


def sincos_embed(coords: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """2-D sine-cosine embedding of continuous (x, y) positions (Vaswani et al., 2017; MAE).

    Kept rather than timm's ``build_sincos2d_pos_embed``, which builds the table of an integer
    feature grid from its shape only: the predictor places tokens at fractional source-image
    coordinates, and timm orders the channels (sin y, sin x, cos y, cos x), not the
    (sin y, cos y, sin x, cos x) that trained checkpoints use.

    Args:
        coords: (..., 2) positions in grid units (x = column, y = row); fractions allowed.
        dim: embedding size, a multiple of 4.
    Returns:
        (..., dim) embedding: half for y, half for x.
    """
    if dim % 4:
        raise ValueError(f"sincos embedding needs dim divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, device=coords.device, dtype=torch.float32) / quarter)
    parts = []
    for axis in (1, 0):
        angles = coords[..., axis : axis + 1].float() * omega
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=-1)


def grid_coords(side: int, device: torch.device | None = None) -> Tensor:
    """(side*side, 2) integer (x, y) coordinates of a row-major patch grid."""
    ys, xs = torch.meshgrid(torch.arange(side, device=device), torch.arange(side, device=device),
                            indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], dim=-1).float()


def rotary_embedding(head_dim: int, theta: float = 100.0) -> RotaryEmbeddingCat:
    """Axial 2-D rotary position embedding (Su et al., 2021; Heo et al., 2024 "RoPE-ViT").

    Half of each head's channels rotate with the token's column, half with its row, at
    frequencies ``theta ** (-i / (head_dim / 4))``; ``get_embed([side, side])`` gives the
    row-major grid's concatenated sin/cos table for :class:`timm.layers.AttentionRope`
    (``rotate_half`` layout).
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
    return RotaryEmbeddingCat(head_dim, temperature=theta, in_pixels=False, grid_indexing="xy", rotate_half=True)


class Block(nn.Module):
    """Pre-norm transformer block of timm's attention (optional RoPE) and MLP, with stochastic depth.

    One :class:`timm.layers.DropPath` serves both residual branches, as before, so a seeded run
    draws the same per-sample masks from the global generator in the same order (exact resume
    with drop-path is tested in ``tests/train/test_checkpoint.py``).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = AttentionRope(dim, num_heads, qkv_bias=True, num_prefix_tokens=0, rotate_half=True)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, rope: Tensor | None = None, attn_mask: Tensor | None = None) -> Tensor:
        """Args:
            x: (N, T, D) tokens.
            rope: optional rotary sin/cos table (see :func:`rotary_embedding`), (T, 2 * head_dim)
                or (N, 1, T, 2 * head_dim).
            attn_mask: optional (N, 1, 1, T) bool, False at tokens no query may attend to.
        """
        x = x + self.drop_path(self.attn(self.norm1(x), rope, attn_mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def forward_rows_from(self, x: Tensor, start: int, attn_mask: Tensor | None = None) -> Tensor:
        """The block's output for rows ``start:`` only; every row still serves as a key and value.

        For a last block whose first rows are discarded (the predictor's context tokens): their
        attention output, projection and MLP are skipped, ~20% of a narrow predictor's last-block
        FLOPs at I-JEPA's context / target ratio. Equals ``self(x, None, attn_mask)[:, start:]``.
        """
        attn = self.attn
        b, n, _ = x.shape
        qkv = attn.qkv(self.norm1(x)).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q[:, :, start:], k, v, attn_mask=attn_mask)
        out = attn.proj(attn.norm(out.transpose(1, 2).reshape(b, n - start, attn.attn_dim)))
        x = x[:, start:] + self.drop_path(out)
        return x + self.drop_path(self.mlp(self.norm2(x)))


def init_weights(module: nn.Module) -> None:
    """Xavier-uniform linear and patch-embedding weights, zero biases, unit LayerNorms (MAE).

    The patch embedding is initialised like a linear layer on the flattened patch (He et al.,
    2022, MAE). I-JEPA's trunc-normal std 0.02 makes patch content ~5x smaller than the fixed
    sine-cosine position table on small patches (48 inputs at patch 4): at init ~76% of the
    target tokens' variance is then position, and a predictor lowers the loss by predicting
    positions instead of content (``tests/models/test_init.py`` guards this).
    """
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d):
        nn.init.xavier_uniform_(module.weight.view(module.weight.shape[0], -1))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def rescale_residual_branches(blocks: nn.ModuleList) -> None:
    """Scales each block's output projections by 1/sqrt(2 * layer) (I-JEPA's init)."""
    for layer, block in enumerate(blocks, start=1):
        assert isinstance(block, Block)
        for weight in (block.attn.proj.weight, block.mlp.fc2.weight):
            weight.data.div_(math.sqrt(2.0 * layer))
