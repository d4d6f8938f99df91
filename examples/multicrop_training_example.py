"""Multi-crop training for H-JEPA, by example: the five examples of the multi-crop design document.

Runs on the CPU on the embedded Fashion-MNIST in a few seconds::

    python examples/multicrop_training_example.py [--output_dir outputs/examples] [--num_workers 2]

1. Basic multi-crop transform: one image -> 2 global (224 px) + 6 local (96 px) crops, with
   each crop's box in the source image; the adaptive (curriculum) variant.
2. Multi-crop dataset usage: a named dataset, or any ``(image, label)`` dataset wrapped.
3. Multi-crop dataloader: batches of crops ``[global_0, global_1, local_0, ..., local_5]``.
4. Masking strategies: ``global_only``, ``global_with_local_context`` and
   ``cross_crop_prediction`` on one batch, each saved as a picture of its masks.
5. A complete training workflow step: H-JEPA forward on all crops, backward, optimiser, EMA.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from hjepa_core.data import (
    AdaptiveMultiCropTransform,
    MultiCropBatch,
    MultiCropDataset,
    MultiCropTransform,
    build_multicrop_dataloader,
    build_multicrop_dataset,
    build_source,
)
from hjepa_core.masks import MASKING_STRATEGIES, MultiCropMaskGenerator, render_multicrop_masks

DATASET = "fashion_mnist"  # embedded default (Debian's dataset-fashion-mnist, or downloaded)
NUM_GLOBAL_CROPS, NUM_LOCAL_CROPS = 2, 6
GLOBAL_CROP_SIZE, LOCAL_CROP_SIZE = 224, 96
DEFAULT_OUTPUT_DIR = Path("outputs/examples")


def _header(title: str) -> None:
    print(f"\n{'=' * 72}\n{title}\n{'=' * 72}")


def _shapes(crops: list[torch.Tensor]) -> str:
    return ", ".join("x".join(map(str, c.shape)) for c in crops)


def example_1_basic_multicrop_transform() -> list[torch.Tensor]:
    """One image into global and local crops; the crop boxes; adaptive local-crop counts."""
    _header("Example 1: basic multi-crop transform")
    image, label = build_source(DATASET, split="train")[0]
    transform = MultiCropTransform(
        num_global_crops=NUM_GLOBAL_CROPS,
        num_local_crops=NUM_LOCAL_CROPS,
        global_crop_size=GLOBAL_CROP_SIZE,
        local_crop_size=LOCAL_CROP_SIZE,
        global_crop_scale=(0.4, 1.0),
        local_crop_scale=(0.05, 0.4),
    )
    generator = torch.Generator().manual_seed(0)
    crops = transform(image, generator)
    print(f"input: {image.mode} {image.size[0]}x{image.size[1]} image (label {label})")
    print(f"{len(crops)} crops: {_shapes(crops)}")
    print(f"normalised float crops: mean {crops[0].mean():+.2f}, std {crops[0].std():.2f}")

    views = transform.sample_views(image, torch.Generator().manual_seed(0))
    print("where each crop came from (box in source pixels, flipped?):")
    for i, geometry in enumerate(views.geometry):
        n_global = views.num_global_crops
        name = f"global {i}" if i < n_global else f"local  {i - n_global}"
        print(f"  {name}: box={geometry.box} flipped={geometry.flipped}")

    adaptive = AdaptiveMultiCropTransform(
        min_local_crops=2, max_local_crops=10, warmup_epochs=30,
        global_crop_size=GLOBAL_CROP_SIZE, local_crop_size=LOCAL_CROP_SIZE,
    )
    schedule = []
    for epoch in (0, 10, 20, 30, 40):
        adaptive.set_epoch(epoch)
        schedule.append(f"epoch {epoch}: {adaptive.current_num_local_crops()}")
    print("adaptive multi-crop, local crops per image:", ", ".join(schedule))
    return crops


def spec_multicrop_dataset(split: str = "train") -> MultiCropDataset:
    """The spec's multi-crop dataset (2 x 224 + 6 x 96 crops), on Fashion-MNIST."""
    return build_multicrop_dataset(
        dataset_name=DATASET,
        split=split,
        num_global_crops=NUM_GLOBAL_CROPS,
        num_local_crops=NUM_LOCAL_CROPS,
        global_crop_size=GLOBAL_CROP_SIZE,
        local_crop_size=LOCAL_CROP_SIZE,
    )


def example_2_multicrop_dataset() -> MultiCropDataset:
    """A named multi-crop dataset, and an existing dataset wrapped with a transform."""
    _header("Example 2: multi-crop dataset")
    dataset = spec_multicrop_dataset("train")  # build_multicrop_dataset(dataset_name=..., ...)
    print(f"{DATASET} train: {len(dataset)} images, classes {dataset.classes}")
    crops, label = dataset[0]
    print(f"dataset[0]: label {label} ({dataset.classes[label]}), "
          f"{len(crops)} uint8 crops: {_shapes(crops)}")
    print("  (colour jitter and normalisation run batched in the loader's collate)")

    # Any dataset of (PIL image, label) becomes multi-crop, e.g. CIFAR-style small images
    # with the spec's low-resolution crop scales.
    wrapped = MultiCropDataset(
        build_source(DATASET, split="test"),
        global_crop_scale=(0.6, 1.0),
        local_crop_scale=(0.2, 0.6),
        num_local_crops=4,
        global_crop_size=GLOBAL_CROP_SIZE,
        local_crop_size=LOCAL_CROP_SIZE,
    )
    sample = wrapped[(0, 1234)]  # (index, seed): reproducible crops
    print(f"wrapped test split: {len(wrapped)} images, {len(sample.crops)} crops per image, "
          f"first global box {sample.geometry[0].box}")
    return dataset


def example_3_multicrop_dataloader(num_workers: int = 2, batch_size: int = 8) -> MultiCropBatch:
    """Batches of crops from the seeded multi-crop loader (augmentation in the workers)."""
    _header("Example 3: multi-crop dataloader")
    dataset = spec_multicrop_dataset()
    dataloader = build_multicrop_dataloader(dataset, batch_size=batch_size,
                                            num_workers=num_workers, seed=0)
    print(f"{len(dataloader)} batches of {batch_size} per epoch, {num_workers} workers")
    batch: MultiCropBatch | None = None
    for step, batch in enumerate(dataloader):
        crops, labels = batch  # crops: [global_0, global_1, local_0, ..., local_5]
        global_crops = crops[:NUM_GLOBAL_CROPS]
        local_crops = crops[NUM_GLOBAL_CROPS:]
        print(f"batch {step}: {len(global_crops)} global {tuple(global_crops[0].shape)}, "
              f"{len(local_crops)} local {tuple(local_crops[0].shape)}, "
              f"labels {labels.tolist()}")
        if step == 1:
            break
    assert batch is not None
    print(f"crop boxes in source coordinates: {tuple(batch.boxes.shape)} "
          f"(crop, image, x0 y0 x1 y1); first: {[round(v, 2) for v in batch.boxes[0, 0].tolist()]}")
    print(f"flipped crops in this batch: {int(batch.flips.sum())} of {batch.flips.numel()}")
    return batch


def example_4_masking_strategies(output_dir: str | Path = DEFAULT_OUTPUT_DIR,
                                 batch_size: int = 4) -> list[Path]:
    """The three masking strategies on one batch, each saved as a PNG of its masks."""
    _header("Example 4: masking strategies")
    dataset = spec_multicrop_dataset()
    pictures = []
    for strategy in MASKING_STRATEGIES:
        mask_gen = MultiCropMaskGenerator(
            global_crop_size=GLOBAL_CROP_SIZE,
            local_crop_size=LOCAL_CROP_SIZE,
            num_global_crops=NUM_GLOBAL_CROPS,
            num_local_crops=NUM_LOCAL_CROPS,
            masking_strategy=strategy,
            num_hierarchies=3,
            num_target_masks=4,
            base_scale=(0.05, 0.15),
            aspect_ratio_range=(0.75, 1.5),
        )
        # Masks are made in the loader's collate (workers); mask_gen(batch_size=...) works too.
        loader = build_multicrop_dataloader(dataset, batch_size=batch_size, num_workers=0,
                                            seed=0, mask_generator=mask_gen)
        batch = next(iter(loader))
        masks = batch.masks
        assert masks is not None
        first = masks.global_masks[0]
        print(f"{strategy}:")
        print(f"  global crops: {first.context.shape[1]} of {first.grid_sizes[0] ** 2} patches "
              f"visible as context; target blocks per level (grid, blocks x patches): "
              + ", ".join(f"{side}x{side}: {t.shape[1]}x{t.shape[2]}"
                          for side, t in zip(first.grid_sizes, first.targets, strict=True)))
        print(f"  local crops: {list(masks.local_roles)}")
        path = render_multicrop_masks(batch, Path(output_dir) / f"masks_{strategy}.png")
        print(f"  picture: {path}")
        pictures.append(path)
    return pictures


def example_5_training_step(steps: int = 5) -> list[float]:
    """A complete training workflow: config -> data + masks -> H-JEPA -> optimiser + EMA steps.

    This is what ``hjepa train`` does (with schedules, checkpoints and MLflow on top), here on
    the small CPU config of the embedded dataset.
    """
    from hjepa_core.config import load_config
    from hjepa_core.models import build_hjepa
    from hjepa_core.train.optim import build_optimizer

    _header("Example 5: a complete training workflow step")
    config = load_config("configs/fashion_mnist.yaml", ["data.max_samples=512", "tracking.enabled=false"])
    dataset = build_multicrop_dataset(dataset_name=DATASET, max_samples=config.data.max_samples,
                                      **dataclasses.asdict(config.crops))
    loader = build_multicrop_dataloader(dataset, batch_size=32, num_workers=0,
                                        mask_generator=config.build_mask_generator())
    torch.manual_seed(0)
    model = build_hjepa(config)
    optimizer = build_optimizer(model, lr=config.training.lr)
    losses = []
    for step, batch in zip(range(steps), loader, strict=False):
        global_crops = batch.crops[: batch.num_global_crops]
        local_crops = batch.crops[batch.num_global_crops:]
        output = model(batch)  # global and local crops, each resolution in one encoder call
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_target(momentum=config.training.ema_momentum)
        losses.append(output.loss.item())
        parts = ", ".join(f"{k.split('/')[-1]}={v.item():.3f}" for k, v in output.parts.items())
        print(f"step {step}: {len(global_crops)} global {tuple(global_crops[0].shape)}, "
              f"{len(local_crops)} local {tuple(local_crops[0].shape)} -> loss {losses[-1]:.4f} ({parts})")
    return losses


def main(argv: list[str] | None = None) -> None:
    """Runs the examples in order."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", "--output-dir", type=Path, default=DEFAULT_OUTPUT_DIR,
                        help="where pictures go (default: %(default)s)")
    parser.add_argument("--num_workers", "--num-workers", type=int, default=2,
                        help="DataLoader workers in example 3 (default: %(default)s)")
    args = parser.parse_args(argv)
    example_1_basic_multicrop_transform()
    example_2_multicrop_dataset()
    example_3_multicrop_dataloader(num_workers=args.num_workers)
    example_4_masking_strategies(output_dir=args.output_dir)
    example_5_training_step()
    print(f"\nDone. Pictures are in {args.output_dir}/")


if __name__ == "__main__":
    main()
