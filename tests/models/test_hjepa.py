"""The H-JEPA loss: every strategy uses the local crops, every level matters, EMA maths."""

import copy

import pytest
import torch

from hjepa_core.config import load_config
from hjepa_core.data import build_multicrop_dataloader, build_multicrop_dataset
from hjepa_core.masks import MASKING_STRATEGIES, HierarchicalMasks
from hjepa_core.models import build_hjepa, source_positions
from tests.tiny import TINY_OVERRIDES


def tiny_config(strategy: str = "global_only", *extra: str):
    return load_config("configs/fashion_mnist.yaml", [*TINY_OVERRIDES, f"masking.strategy={strategy}", *extra])


def first_batch(cfg, batch_size: int = 8):
    mc = cfg.crops
    dataset = build_multicrop_dataset("fashion_mnist", max_samples=64, num_global_crops=mc.num_global_crops,
                                      num_local_crops=mc.num_local_crops, global_crop_size=mc.global_crop_size,
                                      local_crop_size=mc.local_crop_size)
    loader = build_multicrop_dataloader(dataset, batch_size=batch_size, num_workers=0,
                                        mask_generator=cfg.build_mask_generator())
    return next(iter(loader))


def encoder_grad(model, batch) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    model(batch).loss.backward()
    return torch.cat([p.grad.flatten() for p in model.encoder.parameters() if p.grad is not None])


@pytest.mark.parametrize("strategy", MASKING_STRATEGIES)
def test_local_crops_change_the_gradient(strategy):
    cfg = tiny_config(strategy)
    torch.manual_seed(0)
    model = build_hjepa(cfg)
    batch = first_batch(cfg)
    base = encoder_grad(model, batch)
    changed = copy.copy(batch)
    n_g = batch.num_global_crops
    changed.crops = [*batch.crops[:n_g], *(torch.randn_like(c) for c in batch.crops[n_g:])]
    assert not torch.allclose(base, encoder_grad(model, changed))
    assert torch.isfinite(base).all()


@pytest.mark.parametrize("level", [0, 1])
def test_every_hierarchy_level_changes_the_gradient(level):
    cfg = tiny_config()
    torch.manual_seed(0)
    model = build_hjepa(cfg)
    batch = first_batch(cfg)
    full = encoder_grad(model, batch)
    model.hierarchy_weights = [0.0 if k == level else w for k, w in enumerate(cfg.loss.hierarchy_weights)]
    assert not torch.allclose(full, encoder_grad(model, batch))


def test_strategies_differ_measurably():
    losses = {}
    for strategy in MASKING_STRATEGIES:
        cfg = tiny_config(strategy)
        torch.manual_seed(0)
        model = build_hjepa(cfg)
        torch.manual_seed(1)
        out = model(first_batch(cfg))
        losses[strategy] = out.loss.item()
        assert "loss/local" in out.parts
    assert len({round(v, 6) for v in losses.values()}) == 3, losses


def test_single_crop_mode_trains_without_locals():
    cfg = tiny_config("global_only", "data.use_multicrop=false")
    model = build_hjepa(cfg)
    batch = first_batch(cfg)
    assert len(batch.crops) == 1
    out = model(batch)
    assert "loss/local" not in out.parts and torch.isfinite(out.loss)


def test_ema_update_matches_formula():
    cfg = tiny_config()
    model = build_hjepa(cfg)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in model.target_encoder.parameters()]
    model.update_target(0.9)
    for old, new, online in zip(before, model.target_encoder.parameters(), model.encoder.parameters(), strict=True):
        assert torch.allclose(new, 0.9 * old + 0.1 * online, atol=1e-6)
    assert not any(p.requires_grad for p in model.target_encoder.parameters())


def test_bf16_target_pass_tracks_the_fp32_ema_weights():
    """A bf16 target pass gives fp32 tokens within bf16 rounding of the fp32 pass, follows every
    EMA step, and leaves the EMA weights in fp32; fp32 is the plain target encoder."""
    cfg = tiny_config()
    torch.manual_seed(0)
    model = build_hjepa(cfg)
    batch = first_batch(cfg)
    images = torch.cat(batch.crops[:batch.num_global_crops])
    model.target_precision = "fp32"
    torch.testing.assert_close(model.encode_targets(images), model.target_encoder(images), rtol=0, atol=0)
    for step in range(2):
        model.target_precision = "fp32"
        exact = model.encode_targets(images)
        model.target_precision = "bf16"
        approx = model.encode_targets(images)
        assert approx.dtype == torch.float32 and approx.shape == exact.shape
        assert 0 < ((approx - exact).norm() / exact.norm()).item() < 0.03, step
        with torch.no_grad():
            for p in model.encoder.parameters():
                p.add_(torch.randn_like(p))
        model.update_target(0.5)
    assert all(p.dtype == torch.float32 for p in model.target_encoder.state_dict().values())


def test_target_precision_reaches_the_model_and_trains():
    cfg = tiny_config("global_only", "training.target_precision=bf16")
    model = build_hjepa(cfg)
    assert model.target_precision == "bf16"
    model(first_batch(cfg)).loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.encoder.parameters() if p.grad is not None)


def test_source_positions_follow_box_and_flip():
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.5, 0.25, 1.0, 0.75]])
    pos = source_positions(boxes, torch.tensor([False, True]), side=2)
    assert torch.allclose(pos[0, :, :2], torch.tensor([[0.25, 0.25], [0.75, 0.25], [0.25, 0.75], [0.75, 0.75]]))
    # flipped crop: the first column of patches sits at the right of the box
    assert torch.allclose(pos[1, 0, :2], torch.tensor([0.875, 0.375]))
    assert torch.allclose(pos[1, 0, 2:], torch.tensor([0.25, 0.25]))
    coarse = source_positions(boxes, torch.tensor([False, False]), side=4, cell=2)
    assert torch.allclose(coarse[0, 0], torch.tensor([0.25, 0.25, 0.5, 0.5]))


def test_local_crops_are_encoded_from_their_kept_patches_only():
    cfg = tiny_config("global_only", "masking.local_mask_ratio=0.5")
    torch.manual_seed(0)
    model = build_hjepa(cfg).eval()
    batch = first_batch(cfg)
    keep = batch.masks.local_keep
    patch = cfg.model.patch_size
    side = cfg.crops.local_crop_size // patch
    assert keep.shape[1] == round(side * side * 0.5)  # half of the local crop's patches are kept
    base = model(batch).parts["loss/local"]
    assert torch.isfinite(base)
    dropped = sorted(set(range(side * side)) - set(keep[0].tolist()))

    def perturbed(index: int) -> float:
        changed = copy.copy(batch)
        n_g = batch.num_global_crops
        crop = batch.crops[n_g].clone()  # first local crop; row 0 of local_keep is its first image
        row, col = divmod(index, side)
        crop[0, :, row * patch:(row + 1) * patch, col * patch:(col + 1) * patch] += 3.0
        changed.crops = [*batch.crops[:n_g], crop, *batch.crops[n_g + 1:]]
        return model(changed).parts["loss/local"]

    assert torch.allclose(perturbed(dropped[0]), base)
    assert not torch.allclose(perturbed(int(keep[0, 0])), base)


@pytest.mark.parametrize("multicrop", [True, False])
def test_image_level_prediction_from_global_contexts_changes_the_gradient(multicrop):
    cfg = tiny_config("global_only", f"data.use_multicrop={str(multicrop).lower()}")
    torch.manual_seed(0)
    model = build_hjepa(cfg)
    batch = first_batch(cfg)
    assert torch.isfinite(model(batch).parts["loss/image"])
    full = encoder_grad(model, batch)
    model.image_weight = 0.0
    assert not torch.allclose(full, encoder_grad(model, batch))
    assert "loss/image" not in model(batch).parts


def test_local_level_prediction_uses_the_global_level_targets():
    """``loss.local_level_weight``: each local crop predicts the global crop's masked blocks at every
    level, so the term depends on the global target features and changes the encoder's gradient."""
    cfg = tiny_config("global_only", "loss.local_level_weight=1.0")
    torch.manual_seed(0)
    model = build_hjepa(cfg)
    batch = first_batch(cfg)
    out = model(batch)
    assert "loss/local_levels" in out.parts and torch.isfinite(out.parts["loss/local_levels"])
    with_levels = encoder_grad(model, batch)
    model.local_level_weight = 0.0
    assert "loss/local_levels" not in model(batch).parts
    assert not torch.allclose(with_levels, encoder_grad(model, batch))


def test_target_only_local_crops_are_predicted_and_not_encoded():
    """``masking.cross_crop_target_fraction=1``: every local crop is a target of the global context,
    so they shape the gradient through their target features only (no local context term)."""
    cfg = tiny_config("cross_crop_prediction", "masking.cross_crop_target_fraction=1.0")
    torch.manual_seed(0)
    model = build_hjepa(cfg)
    batch = first_batch(cfg)
    out = model(batch)
    assert torch.isfinite(out.parts["loss/cross_crop"]) and "loss/local" not in out.parts
    base = encoder_grad(model, batch)
    changed = copy.copy(batch)
    n_g = batch.num_global_crops
    changed.crops = [*batch.crops[:n_g], *(torch.randn_like(c) for c in batch.crops[n_g:])]
    assert not torch.allclose(base, encoder_grad(model, changed))


def test_sigreg_term_regularises_the_context_encoder():
    """``loss.sigreg_weight``: SIGReg on the pooled context embeddings is a loss part and changes
    the encoder's gradient; 0 leaves it out."""
    cfg = tiny_config("global_only", "loss.sigreg_weight=0.5")
    torch.manual_seed(0)
    model = build_hjepa(cfg)
    batch = first_batch(cfg)
    torch.manual_seed(1)
    assert torch.isfinite(model(batch).parts["loss/sigreg"])
    torch.manual_seed(1)
    with_sigreg = encoder_grad(model, batch)
    model.sigreg_weight = 0.0
    assert "loss/sigreg" not in model(batch).parts
    torch.manual_seed(1)
    assert not torch.allclose(with_sigreg, encoder_grad(model, batch))


@pytest.mark.parametrize("strategy", MASKING_STRATEGIES)
def test_target_padding_changes_neither_loss_nor_gradient(strategy):
    """Fixed-size (padded) target blocks give what the unpadded blocks give: the padding is
    hidden from attention and from the loss (also where local crops predict the global blocks)."""
    cfg = tiny_config(strategy, "loss.local_level_weight=1.0", "training.compile=true")  # padded masks
    torch.manual_seed(0)
    model = build_hjepa(cfg)
    batch = first_batch(cfg)
    padded_levels = [k for k, v in enumerate(batch.masks.global_masks[0].target_valid) if not v.all()]
    assert padded_levels, "this batch needs a level whose blocks are smaller than the fixed size"
    unpadded = copy.copy(batch)
    unpadded.masks = copy.copy(batch.masks)
    unpadded.masks.global_masks = [
        HierarchicalMasks(m.context, [t[..., :int(v[0, 0].sum())] for t, v in zip(m.targets, m.target_valid,
                                                                                    strict=True)], m.grid_sizes)
        for m in batch.masks.global_masks
    ]
    assert unpadded.masks.global_masks[0].targets[padded_levels[0]].shape[-1] < (
        batch.masks.global_masks[0].targets[padded_levels[0]].shape[-1])
    out, ref = model(batch), model(unpadded)
    assert "loss/local_levels" in ref.parts
    for name in ref.parts:
        torch.testing.assert_close(out.parts[name], ref.parts[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(encoder_grad(model, batch), encoder_grad(model, unpadded), rtol=1e-4, atol=1e-6)
