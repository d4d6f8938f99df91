"""Reusable transformer layers (timm-style): patch embedding, attention, MLP, block, RoPE.

Attention goes through ``F.scaled_dot_product_attention`` so the fused flash / memory-efficient
kernels are used where the device has them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sincos_embed(coords: Tensor, dim: int, temperature: float = 10000.0) -> Tensor:
    """2-D sine-cosine embedding of continuous (x, y) positions (Vaswani et al., 2017; MAE).

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


class RotaryEmbedding2D(nn.Module):
    """Axial 2-D rotary position embedding (Su et al., 2021; Heo et al., 2024 "RoPE-ViT").

    Half of each head's channels rotate with the token's column, half with its row.
    """

    freqs: Tensor  # a registered buffer (declared so type checkers see a Tensor, not a Module)

    def __init__(self, head_dim: int, theta: float = 100.0) -> None:
        super().__init__()
        if head_dim % 4:
            raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
        freqs = 1.0 / theta ** (torch.arange(0, head_dim // 4, dtype=torch.float32) / (head_dim // 4))
        self.register_buffer("freqs", freqs, persistent=False)

    def angles(self, coords: Tensor) -> tuple[Tensor, Tensor]:
        """(N, T, 2) coordinates -> cos/sin tables of shape (N, 1, T, head_dim / 2)."""
        angles = torch.cat([coords[..., 0:1] * self.freqs, coords[..., 1:2] * self.freqs], dim=-1)
        return angles.cos()[:, None], angles.sin()[:, None]

    @staticmethod
    def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        x1, x2 = x.float().chunk(2, dim=-1)
        return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class PatchEmbed(nn.Module):
    """Image to non-overlapping patch tokens with one strided convolution."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] % self.patch_size or x.shape[-2] % self.patch_size:
            raise ValueError(f"image {tuple(x.shape[-2:])} is not divisible by patch {self.patch_size}")
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention through ``scaled_dot_product_attention``, optional 2-D RoPE."""

    def __init__(self, dim: int, num_heads: int, use_rope: bool = False) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)
        self.rope = RotaryEmbedding2D(dim // num_heads) if use_rope else None

    def forward(self, x: Tensor, coords: Tensor | None = None, attn_mask: Tensor | None = None) -> Tensor:
        """``attn_mask``: optional (N, 1, 1, T) bool, False at tokens no query may attend to."""
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        if self.rope is not None:
            if coords is None:
                raise ValueError("RoPE attention needs token coordinates")
            cos, sin = self.rope.angles(coords)
            q, k = self.rope.rotate(q, cos, sin), self.rope.rotate(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(out.transpose(1, 2).reshape(n, t, d))


class DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al., 2016)."""

    def __init__(self, drop_prob: float = 0.0) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: Tensor) -> Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0,
                 use_rope: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, use_rope)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, coords: Tensor | None = None, attn_mask: Tensor | None = None) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), coords, attn_mask))
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
