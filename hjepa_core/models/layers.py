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
from timm.layers import AttentionRope, DropPath, Mlp, RotaryEmbeddingCat, apply_rot_embed_cat
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode


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

    def _attend(self, x: Tensor, rope: Tensor | None, attn_mask: Tensor | None, start: int = 0) -> Tensor:
        """Multi-head attention of the normed tokens ``x`` for query rows ``start:``, before the
        output projection: (N, T - start, D). Every row serves as a key and value."""
        attn = self.attn
        b, n, _ = x.shape
        qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        if rope is not None:
            q = apply_rot_embed_cat(q, rope, half=True)
            k = apply_rot_embed_cat(k, rope, half=True)
        out = F.scaled_dot_product_attention(q[:, :, start:], k, v, attn_mask=attn_mask)
        return attn.norm(out.transpose(1, 2).reshape(b, n - start, attn.attn_dim))

    def forward_rows_from(self, x: Tensor, start: int, attn_mask: Tensor | None = None) -> Tensor:
        """The block's output for rows ``start:`` only; every row still serves as a key and value.

        For a last block whose first rows are discarded (the predictor's context tokens): their
        attention output, projection and MLP are skipped, ~20% of a narrow predictor's last-block
        FLOPs at I-JEPA's context / target ratio. Equals ``self(x, None, attn_mask)[:, start:]``.
        """
        out = self.attn.proj(self._attend(self.norm1(x), None, attn_mask, start))
        x = x[:, start:] + self.drop_path(out)
        return x + self.drop_path(self.mlp(self.norm2(x)))

    @torch.no_grad()
    def forward_inference_(self, x: Tensor, rope: Tensor | None = None) -> Tensor:
        """``self(x, rope)`` in eval mode without autograd, computed in ``x``'s own memory.

        The output projections accumulate straight into the residual stream (``addmm_``) and GELU
        runs in place, so a block allocates no fresh (N, T, D) residual buffers and no second
        (N, T, 4D) hidden buffer. First touches of fresh memory are a CPU step's hidden cost: the
        no-grad EMA target encoder over full images paid ~5% of an I-JEPA step in them
        (``benchmarks/README.md``, "Training step"). Used by :class:`VisionTransformer` for the
        target encoder and feature extraction; ``x`` must be contiguous and is overwritten.
        """
        if self.training:
            raise RuntimeError("forward_inference_ is for eval mode (no stochastic depth)")
        d = x.shape[-1]
        stream = x.view(-1, d)
        attended = self._attend(self.norm1(x), rope, None)
        _add_linear_(stream, attended.view(-1, d), self.attn.proj)
        hidden = self.mlp.fc1(self.norm2(x))
        torch.ops.aten.gelu_(hidden)
        assert isinstance(self.mlp.fc2, nn.Linear)  # timm's Mlp without use_conv
        _add_linear_(stream, hidden.view(-1, hidden.shape[-1]), self.mlp.fc2)
        return x


def _add_linear_(stream: Tensor, inputs: Tensor, linear: nn.Linear) -> None:
    """``stream += linear(inputs)`` for 2-D ``stream`` and ``inputs``, in one in-place GEMM."""
    stream.addmm_(inputs, linear.weight.t())
    if linear.bias is not None:
        stream.add_(linear.bias)


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter that also counts the in-place GEMMs of :meth:`Block.forward_inference_`
    (``addmm_``, which ``FlopCounterMode`` does not know): the benchmarks' model FLOPs."""

    def addmm_flops(self_shape: tuple[int, ...], a_shape: tuple[int, ...], b_shape: tuple[int, ...], *args: object,
                    **kwargs: object) -> int:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]

    return FlopCounterMode(display=False, custom_mapping={torch.ops.aten.addmm_: addmm_flops})


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
