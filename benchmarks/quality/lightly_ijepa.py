"""Reference I-JEPA built from lightly's modules, trained on a wall-clock budget.

The model (:class:`LightlyIJEPA`, shared with ``benchmarks/bench_train_step.py``) is lightly's
``IJEPABackbone`` (torchvision ViT: class token, learned positions) as context and EMA target
encoder and ``IJEPAPredictor``, wired as lightly's I-JEPA example (target encoder -> layer norm ->
``apply_masks`` -> ``repeat_interleave_batch``; context encoder with ``idx_keep``; smooth-L1).

:func:`train_lightly` trains it the way the quality benchmark trains our variants:

- data: the Fashion-MNIST train split (``data.max_samples`` of the config; all 60,000 when null)
  through lightly's ``IJEPATransform`` (RandomResizedCrop to the global crop size, scale
  (0.3, 1.0), horizontal flip, ImageNet normalisation), as RGB;
- masks: lightly's ``IJEPAMaskCollator`` on the patch grid: one context block of scale
  (0.85, 1.0), ``masking.num_target_masks`` target blocks of scale (0.15, 0.2) (I-JEPA's) and
  aspect ``masking.aspect_ratio_range``; on the 8x8 grid that is 2 blocks of 9-12 patches and
  about 27 context patches after the batch-minimum cut;
- sizes, batch size, lr / min lr, weight decay (cosine), warmup fraction
  (``warmup_epochs / epochs``), EMA momentum (linear) and precision from the config, with
  every schedule following elapsed training time / budget (as ``training.time_budget_s`` does
  for ours); AdamW with the library's parameter groups; no gradient clipping (I-JEPA's recipe).

Outputs in ``output_dir``: ``lightly_ijepa.pt`` (settings, context and target encoder weights)
and ``metrics.json`` (``images_seen``, ``train_seconds``, ``steps``, ``final_loss``).

    python benchmarks/quality/lightly_ijepa.py --budget 180 --seed 0 --out outputs/lightly_ijepa
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from hjepa_core.config import Config, load_config
from hjepa_core.data.sources import SubsetSource, load_fashion_mnist
from hjepa_core.models.vit import resolve_encoder_size
from hjepa_core.train.engine import autocast_dtype, resolve_device
from hjepa_core.train.optim import build_optimizer, set_schedule
from hjepa_core.train.schedules import cosine_schedule, ema_momentum
from hjepa_core.utils import atomic_torch_save, atomic_write_text

WEIGHTS_FILE = "lightly_ijepa.pt"
CONTEXT_SCALE = (0.85, 1.0)
TARGET_SCALE = (0.15, 0.2)
CROP_SCALE = (0.3, 1.0)


def build_backbone(s: dict[str, Any]) -> nn.Module:
    """lightly's ``IJEPABackbone`` of the settings' image size, patch size and encoder width/depth."""
    from lightly.models.modules.ijepa import IJEPABackbone

    e = s["encoder"]
    return IJEPABackbone(
        image_size=s["image_size"], patch_size=s["patch_size"], num_layers=e["depth"],
        num_heads=e["num_heads"], hidden_dim=e["embed_dim"], mlp_dim=int(e["embed_dim"] * e["mlp_ratio"]),
    )


class LightlyIJEPA(nn.Module):
    """lightly's I-JEPA modules wired as in lightly's I-JEPA example.

    Args:
        s: ``image_size``, ``patch_size`` and ``encoder`` / ``predictor`` dicts with
            ``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio``.
    """

    def __init__(self, s: dict[str, Any]) -> None:
        from lightly.models.modules.ijepa import IJEPAPredictor
        from torchvision.models.vision_transformer import Encoder

        e, p = s["encoder"], s["predictor"]
        num_patches = (s["image_size"] // s["patch_size"]) ** 2
        super().__init__()
        self.encoder = build_backbone(s)
        self.target_encoder = copy.deepcopy(self.encoder)
        self.target_encoder.requires_grad_(False)
        # IJEPAPredictor's ``mlp_dim`` is both its input/output width (encoder width) and its
        # blocks' MLP width, so build the block stack separately (as ``from_vit_encoder``
        # does) to give the predictor blocks mlp_ratio 4 like ours.
        stack = Encoder(
            seq_length=num_patches, num_layers=p["depth"], num_heads=p["num_heads"],
            hidden_dim=p["embed_dim"], mlp_dim=int(p["embed_dim"] * p["mlp_ratio"]),
            dropout=0.0, attention_dropout=0.0,
        )
        self.predictor = IJEPAPredictor(
            seq_length=num_patches, num_layers=1, num_heads=1, hidden_dim=p["embed_dim"],
            predictor_embed_dim=p["embed_dim"], num_patches=num_patches,
            mlp_dim=e["embed_dim"], dropout=0.0, attention_dropout=0.0,
        )
        self.predictor.layers = stack.layers
        self.predictor.ln = stack.ln
        self.criterion = nn.SmoothL1Loss()

    def forward(self, images: Tensor, masks_enc: list[Tensor], masks_pred: list[Tensor]) -> Tensor:
        """The I-JEPA loss; masks index the patch grid (the class token is skipped here)."""
        from lightly.models import utils

        with torch.no_grad():
            h = self.target_encoder(images)
            h = F.layer_norm(h, (h.size(-1),))
            h = utils.apply_masks(h, [m + 1 for m in masks_pred])  # +1: skip the class token
            h = utils.repeat_interleave_batch(h, len(images), repeat=len(masks_enc))
        z = self.encoder(images, [m + 1 for m in masks_enc])
        z = self.predictor(z, masks_enc, masks_pred)
        return self.criterion(z, h)


def settings_from_config(config: Config) -> dict[str, Any]:
    """:class:`LightlyIJEPA` settings with our config's crop size, patch size and model sizes."""
    m = config.model
    return {
        "image_size": config.data.multicrop.global_crop_size,
        "patch_size": m.patch_size,
        "encoder": {**resolve_encoder_size(m), "mlp_ratio": m.mlp_ratio},
        "predictor": {"embed_dim": m.predictor_embed_dim, "depth": m.predictor_depth,
                      "num_heads": m.predictor_num_heads, "mlp_ratio": m.mlp_ratio},
    }


class _RGBTransform:
    """lightly's ``IJEPATransform`` on the RGB version of a (grayscale) PIL image; picklable."""

    def __init__(self, size: int) -> None:
        from lightly.transforms.ijepa_transform import IJEPATransform

        self.transform = IJEPATransform(input_size=size, min_scale=CROP_SCALE[0])

    def __call__(self, image: Any) -> Tensor:
        return self.transform(image.convert("RGB"))


class _Images(torch.utils.data.Dataset):
    """Transformed images with their labels."""

    def __init__(self, source: torch.utils.data.Dataset, transform: _RGBTransform) -> None:
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.source[index]
        return self.transform(image), label


def build_loader(config: Config, seed: int) -> torch.utils.data.DataLoader:
    """Shuffled, drop-last loader of (images, masks_enc, masks_pred) batches from lightly's collator."""
    from lightly.data import IJEPAMaskCollator

    size = config.data.multicrop.global_crop_size
    source = load_fashion_mnist(config.data.data_path, "train")
    if config.data.max_samples is not None:
        source = SubsetSource(source, config.data.max_samples)
    collator = IJEPAMaskCollator(
        input_size=(size, size), patch_size=config.model.patch_size, enc_mask_scale=CONTEXT_SCALE,
        pred_mask_scale=TARGET_SCALE, aspect_ratio=tuple(config.masking.aspect_ratio_range), nenc=1,
        npred=config.masking.num_target_masks,
    )
    workers = config.data.num_workers
    return torch.utils.data.DataLoader(
        _Images(source, _RGBTransform(size)), batch_size=config.training.batch_size, shuffle=True,
        drop_last=True, num_workers=workers, persistent_workers=workers > 0, collate_fn=collator,
        generator=torch.Generator().manual_seed(seed),
        pin_memory=config.data.pin_memory and resolve_device(config.training.device).type == "cuda",
    )


def train_lightly(config: Config, budget_s: float, seed: int, output_dir: str | Path,
                  progress: bool = False) -> dict[str, Any]:
    """Trains the lightly reference for ``budget_s`` seconds of training time (see the module doc).

    Returns:
        The metrics also written to ``output_dir/metrics.json``.
    """
    from lightly.models.utils import update_momentum

    t = config.training
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = resolve_device(t.device)
    amp = autocast_dtype(t.precision, device)
    torch.manual_seed(seed)
    s = settings_from_config(config)
    model = LightlyIJEPA(s).to(device).train()
    optimizer = build_optimizer(model, t.lr)
    loader = build_loader(config, seed)
    warmup = min(t.warmup_epochs / t.epochs, 1.0)
    steps, images_seen, train_seconds, loss_sum, loss_count = 0, 0, 0.0, 0.0, 0
    bar = tqdm(total=round(budget_s), disable=not progress, desc="lightly I-JEPA (s)", dynamic_ncols=True)
    clock = time.perf_counter()
    while train_seconds < budget_s:
        for (images, _), masks_enc, masks_pred in loader:
            done = min(train_seconds / budget_s, 1.0)
            set_schedule(optimizer, cosine_schedule(done, 1.0, t.lr, t.min_lr, warmup),
                         cosine_schedule(done, 1.0, t.weight_decay, t.weight_decay_end))
            images = images.to(device, non_blocking=True)
            masks_enc = [m.to(device, non_blocking=True) for m in masks_enc]
            masks_pred = [m.to(device, non_blocking=True) for m in masks_pred]
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                loss = model(images, masks_enc, masks_pred)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            update_momentum(model.encoder, model.target_encoder, ema_momentum(done, 1.0, t.ema_momentum,
                                                                              t.ema_momentum_end))
            steps += 1
            images_seen += len(images)
            if steps % t.log_every == 0 or loss_count == 0:  # a loss read syncs the device: not every step
                loss_sum, loss_count = loss_sum + float(loss.detach()), loss_count + 1
            now = time.perf_counter()
            train_seconds += now - clock
            clock = now
            bar.update(round(min(train_seconds, budget_s)) - bar.n)
            if train_seconds >= budget_s:
                break
    bar.close()
    atomic_torch_save({"settings": s, "encoder": model.encoder.state_dict(),
                       "target_encoder": model.target_encoder.state_dict()}, out / WEIGHTS_FILE)
    metrics = {"steps": steps, "images_seen": images_seen, "train_seconds": train_seconds,
               "final_loss": float(loss.detach()), "mean_logged_loss": loss_sum / max(loss_count, 1),
               "settings": s, "masks": {"context_scale": CONTEXT_SCALE, "target_scale": TARGET_SCALE,
                                        "num_targets": config.masking.num_target_masks,
                                        "aspect_ratio": tuple(config.masking.aspect_ratio_range)},
               "crop_scale": CROP_SCALE, "warmup_fraction": warmup}
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    return metrics


def lightly_tokens(path: str | Path, which: str = "target", device: str = "cpu") -> Callable[[Tensor], Tensor]:
    """Token function (images -> patch tokens, class token dropped) of a trained reference encoder.

    Args:
        path: ``lightly_ijepa.pt`` or the folder holding it.
        which: ``target`` (EMA) or ``context`` (online) encoder.
        device: where the encoder runs.
    """
    path = Path(path)
    state = torch.load(path / WEIGHTS_FILE if path.is_dir() else path, map_location="cpu", weights_only=True)
    backbone = build_backbone(state["settings"])
    backbone.load_state_dict(state[{"target": "target_encoder", "context": "encoder"}[which]])
    backbone.requires_grad_(False).eval().to(device)
    return lambda images: backbone(images)[:, 1:]


def main(argv: list[str] | None = None) -> None:
    """Trains one reference run and prints its metrics."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/fashion_mnist.yaml")
    parser.add_argument("--budget", type=float, default=180.0, help="training seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/lightly_ijepa")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data.max_samples=null")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = load_config(args.config, args.overrides)
    metrics = train_lightly(config, args.budget, args.seed, args.out, progress=True)
    print(json.dumps({k: v for k, v in metrics.items() if k != "settings"}, indent=2))


if __name__ == "__main__":
    main()
