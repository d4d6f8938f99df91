"""Vision Transformer encoder (Dosovitskiy et al., 2021) for crops of any patch-grid size.

Position embeddings are fixed 2-D sine-cosine tables computed for the crop's own grid, so one
encoder serves global and local crops. Masked tokens are dropped by gathering the kept
indices before the blocks (I-JEPA), never zeroed.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from hjepa_core.models.layers import (
    Block,
    grid_coords,
    init_weights,
    rescale_residual_branches,
    rotary_embedding,
    sincos_embed,
)

VIT_PRESETS: dict[str, dict[str, int]] = {
    "vit_tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "vit_small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "vit_base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "vit_large": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
}


def resolve_encoder_size(model_cfg: Any) -> dict[str, int]:
    """Preset sizes with any explicit ``embed_dim/depth/num_heads`` of the config applied.

    ``encoder: custom`` requires all three. Raises ValueError naming the key to fix.
    """
    name = model_cfg.encoder
    if name != "custom" and name not in VIT_PRESETS:
        raise ValueError(
            f"model.encoder={name!r} is not one of {', '.join(VIT_PRESETS)} or 'custom'"
        )
    size = dict(VIT_PRESETS.get(name, {}))
    for key in ("embed_dim", "depth", "num_heads"):
        value = getattr(model_cfg, key)
        if value is not None:
            size[key] = value
        elif key not in size:
            raise ValueError(f"model.encoder=custom needs model.{key}")
    if size["embed_dim"] % size["num_heads"]:
        raise ValueError(
            f"model.embed_dim={size['embed_dim']} must be divisible by model.num_heads={size['num_heads']}"
        )
    if size["embed_dim"] % 4:
        raise ValueError(f"model.embed_dim={size['embed_dim']} must be divisible by 4 (2-D position embedding)")
    return size


class VisionTransformer(nn.Module):
    """ViT encoder returning patch tokens (no class token), final LayerNorm applied.

    Args:
        patch_size: patch side in pixels.
        embed_dim, depth, num_heads, mlp_ratio: transformer size.
        drop_path_rate: stochastic-depth rate, linearly increasing over blocks.
        use_rope: rotary 2-D position embedding in attention instead of additive tables.
        grad_checkpointing: recompute block activations in backward (saves memory).
    """

    def __init__(
        self,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        use_rope: bool = False,
        grad_checkpointing: bool = False,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.use_rope = use_rope
        self.grad_checkpointing = grad_checkpointing
        # img_size=None: any crop whose sides are multiples of the patch (checked in forward).
        self.patch_embed = PatchEmbed(None, patch_size, in_chans, embed_dim)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, rate) for rate in rates)
        self.rope = rotary_embedding(embed_dim // num_heads) if use_rope else None
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.apply(init_weights)
        rescale_residual_branches(self.blocks)

    def arch(self) -> dict[str, Any]:
        """Constructor arguments, saved with weights so the encoder can be rebuilt."""
        block = self.blocks[0]
        assert isinstance(block, Block) and isinstance(block.mlp.fc1, nn.Linear)
        return {
            "patch_size": self.patch_size,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": block.mlp.fc1.out_features / self.embed_dim,
            "use_rope": self.use_rope,
        }

    def _embed_kept_patches(self, images: Tensor, keep: Tensor) -> Tensor:
        """Patch embedding of the kept patches only: the patch convolution as a linear map on the
        gathered pixels, so a masked crop (I-JEPA's context keeps ~30-50% of its patches) does not
        pay for embedding, and back-propagating through, the patches it drops."""
        n, c, h, w = images.shape
        p = self.patch_size
        patches = images.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).flatten(3).flatten(1, 2)
        kept = torch.gather(patches, 1, keep[..., None].expand(-1, -1, patches.shape[-1]))
        proj = self.patch_embed.proj
        return self.patch_embed.norm(F.linear(kept, proj.weight.flatten(1), proj.bias))

    def _in_place_inference(self, x: Tensor) -> bool:
        """Whether the blocks may run :meth:`Block.forward_inference_`: eval mode without autograd
        (the EMA target encoder, feature extraction), eager (inductor fuses the plain path itself)
        and without autocast (the in-place sums keep the residual stream's dtype)."""
        return (not self.training and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
                and not torch.is_autocast_enabled(x.device.type))

    def forward(self, images: Tensor, keep: Tensor | None = None) -> Tensor:
        """Encodes images, optionally keeping only some patches.

        Args:
            images: (N, C, H, W), H and W multiples of the patch size.
            keep: (N, K) indices of patches to keep (row-major); None keeps all.
        Returns:
            (N, K or H*W/p^2, D) tokens.
        """
        if images.shape[-1] % self.patch_size or images.shape[-2] % self.patch_size:
            raise ValueError(f"image {tuple(images.shape[-2:])} is not divisible by patch {self.patch_size}")
        side = images.shape[-1] // self.patch_size
        table = None if self.rope is not None else sincos_embed(grid_coords(side, images.device), self.embed_dim)
        rope = None if self.rope is None else self.rope.get_embed([side, side])
        if keep is None:
            x = self.patch_embed(images)
        else:
            x = self._embed_kept_patches(images, keep)
            table = None if table is None else table[keep]
            rope = None if rope is None else rope[keep][:, None]
        if table is not None:
            x = x + table.to(x.dtype)
        if self._in_place_inference(x):
            x = x.contiguous()  # a fresh tensor of this forward's own: the blocks overwrite it
            for block in self.blocks:
                assert isinstance(block, Block)
                x = block.forward_inference_(x, rope)
            return self.norm(x)
        for block in self.blocks:
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope)
        return self.norm(x)


def build_encoder(model_cfg: Any) -> VisionTransformer:
    """The encoder a :class:`~hjepa_core.config.ModelConfig` describes."""
    size = resolve_encoder_size(model_cfg)
    return VisionTransformer(
        patch_size=model_cfg.patch_size,
        mlp_ratio=model_cfg.mlp_ratio,
        drop_path_rate=model_cfg.drop_path_rate,
        use_rope=model_cfg.use_rope,
        grad_checkpointing=model_cfg.grad_checkpointing,
        **size,
    )
