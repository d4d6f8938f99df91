"""Saved encoders and predictors keep loading: state-dict names and shapes, and the function they compute.

The key lists were generated from the hand-written layers before they became ``timm.layers``
modules; the reference forward below is that code's computation written out in plain torch ops,
so a state dict saved before the change still loads and gives the same outputs.
"""

import math

import torch
import torch.nn.functional as F

from hjepa_core.models.predictor import HierarchicalPredictor
from hjepa_core.models.vit import VisionTransformer

BLOCK_KEYS = {
    "norm1.weight": ("D",), "norm1.bias": ("D",),
    "attn.qkv.weight": ("3D", "D"), "attn.qkv.bias": ("3D",),
    "attn.proj.weight": ("D", "D"), "attn.proj.bias": ("D",),
    "norm2.weight": ("D",), "norm2.bias": ("D",),
    "mlp.fc1.weight": ("4D", "D"), "mlp.fc1.bias": ("4D",),
    "mlp.fc2.weight": ("D", "4D"), "mlp.fc2.bias": ("D",),
}
ENCODER_KEYS = {
    "patch_embed.proj.weight": (32, 3, 4, 4), "patch_embed.proj.bias": (32,),
    **{f"blocks.{i}.{k}": s for i in range(2) for k, s in BLOCK_KEYS.items()},
    "norm.weight": (32,), "norm.bias": (32,),
}
PREDICTOR_KEYS = {
    "mask_token": (1, 1, 16), "level_embed": (2, 16),
    "embed.weight": (16, 32), "embed.bias": (16,),
    "extent_embed.weight": (16, 2), "extent_embed.bias": (16,),
    **{f"blocks.0.{k}": s for k, s in BLOCK_KEYS.items()},
    "norm.weight": (16,), "norm.bias": (16,),
    "heads.0.weight": (32, 16), "heads.0.bias": (32,), "heads.1.weight": (32, 16), "heads.1.bias": (32,),
}


def _shapes(keys: dict, dim: int) -> dict[str, tuple[int, ...]]:
    size = {"D": dim, "3D": 3 * dim, "4D": 4 * dim}
    return {k: tuple(size[s] if isinstance(s, str) else s for s in shape) for k, shape in keys.items()}


def _sincos(coords: torch.Tensor, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    y, x = coords[..., 1:2] * omega, coords[..., 0:1] * omega
    return torch.cat([y.sin(), y.cos(), x.sin(), x.cos()], dim=-1)


def _rope(t: torch.Tensor, coords: torch.Tensor, theta: float = 100.0) -> torch.Tensor:
    quarter = t.shape[-1] // 4
    freqs = 1.0 / theta ** (torch.arange(quarter, dtype=torch.float32) / quarter)
    angles = torch.cat([coords[..., 0:1] * freqs, coords[..., 1:2] * freqs], dim=-1)[:, None]
    t1, t2 = t.chunk(2, dim=-1)
    return torch.cat([t1 * angles.cos() - t2 * angles.sin(), t1 * angles.sin() + t2 * angles.cos()], dim=-1)


def _block(sd: dict, p: str, x: torch.Tensor, heads: int, coords=None, key_valid=None) -> torch.Tensor:
    n, t, d = x.shape
    h = F.layer_norm(x, (d,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
    q, k, v = F.linear(h, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).view(n, t, 3, heads, -1).unbind(2)
    q, k, v = (z.transpose(1, 2) for z in (q, k, v))
    if coords is not None:
        q, k = _rope(q, coords), _rope(k, coords)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
    if key_valid is not None:
        scores = scores.masked_fill(~key_valid[:, None, None, :], float("-inf"))
    attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(n, t, d)
    x = x + F.linear(attn, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
    h = F.layer_norm(x, (d,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
    h = F.linear(F.gelu(F.linear(h, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])), sd[p + "mlp.fc2.weight"],
                 sd[p + "mlp.fc2.bias"])
    return x + h


def _reference_encoder(sd: dict, images: torch.Tensor, keep: torch.Tensor, use_rope: bool) -> torch.Tensor:
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=4)
    x = x.flatten(2).transpose(1, 2)
    side = images.shape[-1] // 4
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    coords = torch.stack([xs.flatten(), ys.flatten()], dim=-1).float()[keep]
    x = torch.gather(x, 1, keep[..., None].expand(-1, -1, x.shape[-1]))
    if not use_rope:
        x = x + _sincos(coords, x.shape[-1])
    for i in range(2):
        x = _block(sd, f"blocks.{i}.", x, heads=2, coords=coords if use_rope else None)
    return F.layer_norm(x, x.shape[-1:], sd["norm.weight"], sd["norm.bias"], eps=1e-6)


def test_encoder_state_dict_and_forward_are_unchanged():
    images = torch.randn(3, 3, 16, 16)
    keep = torch.tensor([[0, 3, 7, 9], [1, 2, 15, 4], [5, 6, 8, 10]])
    for use_rope in (False, True):
        torch.manual_seed(0)
        encoder = VisionTransformer(patch_size=4, embed_dim=32, depth=2, num_heads=2, use_rope=use_rope).eval()
        sd = encoder.state_dict()
        assert {k: tuple(v.shape) for k, v in sd.items()} == _shapes(ENCODER_KEYS, 32)
        with torch.no_grad():
            assert torch.allclose(encoder(images, keep), _reference_encoder(sd, images, keep, use_rope), atol=1e-5)


def test_predictor_state_dict_and_forward_are_unchanged():
    torch.manual_seed(0)
    predictor = HierarchicalPredictor(encoder_dim=32, embed_dim=16, depth=1, num_heads=2, num_levels=2).eval()
    sd = predictor.state_dict()
    assert {k: tuple(v.shape) for k, v in sd.items()} == _shapes(PREDICTOR_KEYS, 16)
    context, context_pos = torch.randn(2, 5, 32), torch.rand(2, 5, 4)
    query_pos = torch.rand(2, 3, 4)
    key_valid = torch.ones(2, 8, dtype=torch.bool)
    key_valid[0, 2] = key_valid[1, 7] = False

    def position(p: torch.Tensor) -> torch.Tensor:
        extent = F.linear(torch.log(p[..., 2:].clamp_min(1e-4)), sd["extent_embed.weight"], sd["extent_embed.bias"])
        return _sincos(p[..., :2] * predictor.pos_scale, 16) + extent

    x = torch.cat([F.linear(context, sd["embed.weight"], sd["embed.bias"]) + position(context_pos),
                   (sd["mask_token"] + sd["level_embed"][1]) + position(query_pos)], dim=1)
    x = _block(sd, "blocks.0.", x, heads=2, key_valid=key_valid)
    x = F.layer_norm(x, (16,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    expected = F.linear(x[:, 5:], sd["heads.1.weight"], sd["heads.1.bias"])
    with torch.no_grad():
        (out,) = predictor(context, context_pos, [(query_pos, 1)], key_valid)
    assert torch.allclose(out, expected, atol=1e-5)


def test_a_block_can_compute_only_its_last_rows():
    """``Block.forward_rows_from`` (the predictor's last block, whose context rows are discarded)
    gives the full block's last rows and the same gradients, with and without a key mask."""
    from hjepa_core.models.layers import Block

    torch.manual_seed(0)
    block = Block(16, 2)
    x = torch.randn(3, 9, 16, requires_grad=True)
    key_valid = torch.ones(3, 1, 1, 9, dtype=torch.bool)
    key_valid[1, ..., 7] = False
    for mask in (None, key_valid):
        grads = []
        for out in (block(x, None, mask)[:, 4:], block.forward_rows_from(x, 4, mask)):
            x.grad = None
            block.zero_grad()
            (out * torch.linspace(-1, 1, 16)).sum().backward()
            grads.append((out.detach(), x.grad.clone(), block.mlp.fc1.weight.grad.clone()))
        for full, rows in zip(*grads, strict=True):
            torch.testing.assert_close(rows, full, rtol=1e-5, atol=1e-6)
