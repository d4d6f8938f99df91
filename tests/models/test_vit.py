import pytest
import torch

from hjepa_core.models.layers import flop_counter, sincos_embed
from hjepa_core.models.vit import VisionTransformer


@pytest.fixture
def vit():
    torch.manual_seed(0)
    return VisionTransformer(patch_size=4, embed_dim=32, depth=2, num_heads=2).eval()


def test_any_grid_size_and_kept_tokens(vit):
    x = torch.randn(3, 3, 32, 32)
    assert vit(x).shape == (3, 64, 32)
    assert vit(torch.randn(3, 3, 16, 16)).shape == (3, 16, 32)
    keep = torch.tensor([[0, 5, 9], [1, 2, 3], [60, 61, 63]])
    assert vit(x, keep).shape == (3, 3, 32)


def test_dropped_tokens_do_not_influence_kept_ones(vit):
    x = torch.randn(1, 3, 32, 32)
    keep = torch.arange(0, 64, 2)[None]
    changed = x.clone()
    changed[..., 4:8, 4:8] += 5.0  # patch (1, 1) = index 9, not kept
    assert torch.allclose(vit(x, keep), vit(changed, keep), atol=1e-6)


def test_kept_patches_are_embedded_as_the_full_grid_would_embed_them(vit):
    """A masked crop embeds only its kept patches (the patch convolution as a linear map on the
    gathered pixels): the same tokens, position included, as embedding every patch and then
    gathering, and the same gradient for the patch embedding."""
    x = torch.randn(3, 3, 32, 32)
    keep = torch.tensor([[0, 5, 9, 63], [1, 2, 3, 4], [40, 41, 62, 63]])
    vit.blocks = torch.nn.ModuleList()  # the embedding, the position table and the final norm only
    full = torch.gather(vit(x), 1, keep[..., None].expand(-1, -1, 32))
    torch.testing.assert_close(vit(x, keep), full, rtol=1e-5, atol=1e-5)
    grads = []
    for out in (vit(x, keep), torch.gather(vit(x), 1, keep[..., None].expand(-1, -1, 32))):
        vit.zero_grad()
        (out * torch.linspace(-1, 1, 32)).sum().backward()
        grads.append(vit.patch_embed.proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_rope_and_checkpointing_variants_run_and_match():
    torch.manual_seed(0)
    rope = VisionTransformer(patch_size=4, embed_dim=32, depth=2, num_heads=2, use_rope=True)
    x = torch.randn(2, 3, 16, 16)
    keep = torch.tensor([[0, 3, 7], [1, 2, 15]])
    assert rope(x, keep).shape == (2, 3, 32)
    torch.manual_seed(0)
    plain = VisionTransformer(patch_size=4, embed_dim=32, depth=2, num_heads=2).train()
    torch.manual_seed(0)
    ckpt = VisionTransformer(patch_size=4, embed_dim=32, depth=2, num_heads=2, grad_checkpointing=True).train()
    a, b = plain(x).sum(), ckpt(x).sum()
    a.backward()
    b.backward()
    assert torch.allclose(a, b)
    assert torch.allclose(plain.patch_embed.proj.weight.grad, ckpt.patch_embed.proj.weight.grad, atol=1e-6)


def test_sincos_embedding_distinguishes_positions():
    coords = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    table = sincos_embed(coords, 16)
    assert table.shape == (4, 16)
    assert torch.cdist(table, table).triu(1)[torch.ones(4, 4).triu(1).bool()].min() > 0.1


@pytest.mark.parametrize("use_rope", [False, True])
def test_no_grad_eval_forward_runs_in_place_and_matches_the_autograd_forward(use_rope):
    """Without autograd in eval mode (the EMA target encoder, feature extraction) the blocks
    accumulate into the residual stream in place: same tokens as the autograd path, the caller's
    images untouched, and train mode or autograd still take the plain path."""
    torch.manual_seed(0)
    vit = VisionTransformer(patch_size=4, embed_dim=32, depth=3, num_heads=2, use_rope=use_rope).eval()
    images = torch.randn(3, 3, 16, 16)
    keep = torch.tensor([[0, 3, 7, 9], [1, 2, 15, 4], [5, 6, 8, 10]])
    before = images.clone()
    for kept in (None, keep):
        expected = vit(images, kept)
        assert expected.requires_grad  # the autograd path
        with torch.no_grad():
            assert vit._in_place_inference(images)
            torch.testing.assert_close(vit(images, kept), expected.detach(), rtol=1e-5, atol=1e-5)
    assert torch.equal(images, before)
    counts = []
    for grad in (True, False):  # the benchmarks' model FLOPs count the in-place GEMMs too
        with flop_counter() as counter, torch.set_grad_enabled(grad):
            vit(images)
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0
    with torch.no_grad():
        assert not vit.train()._in_place_inference(images)
    with pytest.raises(RuntimeError, match="eval mode"):
        vit.blocks[0].forward_inference_(torch.randn(1, 4, 32))
