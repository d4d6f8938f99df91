"""Data-path benchmark: our multi-crop transform and masks against lightly's, side by side.

1. Transform throughput, images/s per core (``torch.set_num_threads(1)``, one process), on the
   same decoded PIL RGB images. Ours is what a loader worker does: ``MultiCropDataset`` item
   (``MultiCropTransform.sample_views``: crop, resize, flip) per image, then
   ``MultiCropCollator`` (stack + batched ``photometric``) per batch, amortised per image.
   lightly's is ``DINOTransform`` per image with the same operations (2 x 224 global + 6 x 96
   local, the same crop scales, flip 0.5, colour jitter 0.4/0.4/0.2/0.1 with p 0.8, no blur,
   grayscale or solarisation, ImageNet normalisation), plus stacking the views into batches.
   lightly resizes with bicubic interpolation (hard-coded); a second lightly row switches its
   crops to bilinear, as ours, so the resampling work is the same.
2. Mask generation for a 14 x 14 grid (224 / 16) at batch 256: our ``MultiCropMaskGenerator``
   (2 global crops, 3 levels x 4 target blocks + context each) and ``HierarchicalMaskGenerator``
   (one crop) against lightly's ``IJEPAMaskCollator`` (one view, its default settings; it
   collates images too, so it gets tiny (1,) tensors). Compared per crop mask.

    python benchmarks/bench_data.py                     # writes benchmarks/results/data.{json,md}
    python benchmarks/bench_data.py --images 8 --repeats 1 --out /tmp/bench   # quick check
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter

from hjepa_core.data import MultiCropCollator, MultiCropDataset, MultiCropTransform
from hjepa_core.data.photometric import IMAGENET_MEAN, IMAGENET_STD
from hjepa_core.masks import HierarchicalMaskGenerator, MultiCropMaskGenerator

TRANSFORM_TARGET = 2.0  # ours >= 2x lightly's images/s per core
MASK_TARGET = 10.0  # ours >= 10x lightly's collator


def natural_images(count: int, width: int = 500, height: int = 375, seed: int = 0
                   ) -> list[Image.Image]:
    """Synthetic natural-ish RGB photos: smooth colour fields, shapes with edges, texture."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        low = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8))
        image = low.resize((width, height), Image.Resampling.BICUBIC)
        draw = ImageDraw.Draw(image)
        for _ in range(12):
            x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
            x1, y1 = x0 + int(rng.integers(10, 200)), y0 + int(rng.integers(10, 150))
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)((x0, y0, x1, y1), fill=color)
        image = image.filter(ImageFilter.GaussianBlur(1.0))
        noise = rng.normal(0.0, 8.0, (height, width, 3))
        pixels = np.clip(np.asarray(image, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
        images.append(Image.fromarray(pixels, "RGB"))
    return images


class _ImageList(torch.utils.data.Dataset):
    def __init__(self, images: list[Image.Image]) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return self.images[index], 0


def ours_transform(images: list[Image.Image], batch_size: int) -> Callable[[], None]:
    """One pass of our loader's work over ``images`` (items + collate per batch)."""
    dataset = MultiCropDataset(_ImageList(images), MultiCropTransform())
    collate = MultiCropCollator(dataset.transform.photometric)

    def run() -> None:
        for start in range(0, len(images), batch_size):
            indices = range(start, min(start + batch_size, len(images)))
            collate([dataset[(i, 1000 + i)] for i in indices])

    return run


def dino_transform(bilinear: bool) -> Callable:
    """lightly's DINOTransform with the same operations as ours (see the module docstring)."""
    from lightly.transforms import DINOTransform
    from lightly.transforms.torchvision_v2_compatibility import torchvision_transforms as T

    transform = DINOTransform(
        global_crop_size=224, global_crop_scale=(0.4, 1.0), local_crop_size=96,
        local_crop_scale=(0.05, 0.4), n_local_views=6, hf_prob=0.5, cj_prob=0.8,
        cj_strength=0.5,  # x (0.8, 0.8, 0.4, 0.2) = DINO's (0.4, 0.4, 0.2, 0.1), ours at 0.4
        random_gray_scale=0.0, gaussian_blur=(0.0, 0.0, 0.0), solarization_prob=0.0,
        normalize={"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
    )
    if bilinear:
        for view in transform.transforms:
            view.transform.transforms[0].interpolation = T.InterpolationMode.BILINEAR
    return transform


def lightly_transform(images: list[Image.Image], batch_size: int, bilinear: bool
                      ) -> Callable[[], None]:
    """One pass of lightly's DINOTransform over ``images`` plus stacking views per batch."""
    transform = dino_transform(bilinear)

    def run() -> None:
        for start in range(0, len(images), batch_size):
            views = [transform(image) for image in images[start:start + batch_size]]
            [torch.stack(group) for group in zip(*views, strict=True)]

    return run


def interleaved(runs: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Times each run ``repeats`` times, interleaved so machine noise hits all alike."""
    return {name: times["wall"] for name, times in interleaved_times(runs, repeats).items()}


def interleaved_times(runs: dict[str, Callable[[], object]], repeats: int
                      ) -> dict[str, dict[str, list[float]]]:
    """:func:`interleaved` with both clocks per pass: ``wall`` seconds and this process's
    ``cpu`` seconds (on a shared machine the CPU time is what the work itself cost)."""
    for run in runs.values():
        run()  # warm up
    seconds: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            wall, cpu = time.perf_counter(), time.process_time()
            run()
            seconds[name]["cpu"].append(time.process_time() - cpu)
            seconds[name]["wall"].append(time.perf_counter() - wall)
    return seconds


def bench_transform(n_images: int, batch_size: int, repeats: int) -> dict:
    images = natural_images(n_images)
    runs = {
        "ours": ours_transform(images, batch_size),
        "lightly_dino_bicubic": lightly_transform(images, batch_size, bilinear=False),
        "lightly_dino_bilinear": lightly_transform(images, batch_size, bilinear=True),
    }
    seconds = interleaved(runs, repeats)
    results = {
        name: {
            "images_per_s_median": n_images / statistics.median(times),
            "images_per_s_best": n_images / min(times),
            "seconds_per_pass": times,
        }
        for name, times in seconds.items()
    }
    ours = results["ours"]["images_per_s_median"]
    for name in ("lightly_dino_bicubic", "lightly_dino_bilinear"):
        results[name]["ours_over_lightly"] = ours / results[name]["images_per_s_median"]
    return {
        "images": f"{n_images} synthetic natural-ish RGB photos, 500x375, decoded PIL",
        "batch_size": batch_size,
        "repeats": repeats,
        "results": results,
    }


def bench_masks(batch_size: int, repeats: int) -> dict:
    from lightly.data.ijepa_collate import IJEPAMaskCollator

    ours_multi = MultiCropMaskGenerator(global_crop_size=224, local_crop_size=96,
                                        num_global_crops=2, num_local_crops=6)
    ours_one = HierarchicalMaskGenerator(input_size=224, patch_size=16)
    collator = IJEPAMaskCollator(input_size=224, patch_size=16)  # lightly's defaults
    tiny = [torch.zeros(1) for _ in range(batch_size)]
    gen = torch.Generator().manual_seed(0)
    runs = {
        "ours_multicrop_2_global": lambda: ours_multi(batch_size, generator=gen),
        "ours_hierarchical_1_crop": lambda: ours_one(batch_size, gen),
        "lightly_ijepa_collator_1_view": lambda: collator(tiny),
    }
    crops_per_call = {"ours_multicrop_2_global": 2 * batch_size,
                      "ours_hierarchical_1_crop": batch_size,
                      "lightly_ijepa_collator_1_view": batch_size}
    seconds = interleaved(runs, repeats)
    results = {
        name: {
            "ms_per_call_median": 1e3 * statistics.median(times),
            "crop_masks_per_call": crops_per_call[name],
            "crop_masks_per_s": crops_per_call[name] / statistics.median(times),
        }
        for name, times in seconds.items()
    }
    lightly = results["lightly_ijepa_collator_1_view"]["crop_masks_per_s"]
    for name in ("ours_multicrop_2_global", "ours_hierarchical_1_crop"):
        results[name]["ours_over_lightly"] = results[name]["crop_masks_per_s"] / lightly
    return {
        "grid": "14x14 (224 px, patch 16)",
        "batch_size": batch_size,
        "repeats": repeats,
        "ours_settings": "3 levels (14, 7, 3) x 4 target blocks, scale (0.05, 0.15), aspect "
                         "(0.75, 1.5), context block scale (0.85, 1.0), per crop",
        "lightly_settings": "IJEPAMaskCollator defaults: 1 context block scale (0.2, 0.8), "
                            "2 target blocks scale (0.2, 0.8), aspect (0.3, 3.0); batch of "
                            "(1,) tensors collated too (negligible)",
        "results": results,
    }


def markdown(report: dict) -> str:
    t, m = report["transform"], report["masks"]
    tr, mr = t["results"], m["results"]
    lines = [
        "# Data-path benchmark: hjepa_core vs lightly",
        "",
        f"Machine: {report['machine']['cpu']}, torch {report['machine']['torch']}, lightly "
        f"{report['machine']['lightly']}; one thread, one process (per core); "
        f"{report['machine']['cores']} cores, load average "
        f"{report['machine']['load_average_1m_at_start']:.1f} at start (other work shares them).",
        "",
        "## Multi-crop transform (2 x 224 + 6 x 96, jitter 0.4 p 0.8, flip 0.5, normalise)",
        "",
        f"Images: {t['images']}; our collate batch {t['batch_size']}; median of "
        f"{t['repeats']} interleaved passes.",
        "",
        "| pipeline | images/s per core (median) | best | ours / this |",
        "|---|---:|---:|---:|",
    ]
    labels = {
        "ours": "ours: sample_views + collate (batched photometric)",
        "lightly_dino_bicubic": "lightly DINOTransform (bicubic, as shipped)",
        "lightly_dino_bilinear": "lightly DINOTransform, crops switched to bilinear",
    }
    for name, label in labels.items():
        r = tr[name]
        ratio = f"{r['ours_over_lightly']:.2f}x" if "ours_over_lightly" in r else "-"
        lines.append(f"| {label} | {r['images_per_s_median']:.1f} | "
                     f"{r['images_per_s_best']:.1f} | {ratio} |")
    lines += [
        "",
        f"## Masks ({m['grid']}, batch {m['batch_size']}, median of {m['repeats']} calls)",
        "",
        f"Ours: {m['ours_settings']}. lightly: {m['lightly_settings']}.",
        "",
        "| generator | ms per call | crop masks per call | crop masks/s | ours / lightly |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in mr.items():
        ratio = f"{r['ours_over_lightly']:.1f}x" if "ours_over_lightly" in r else "-"
        lines.append(f"| {name} | {r['ms_per_call_median']:.2f} | {r['crop_masks_per_call']} | "
                     f"{r['crop_masks_per_s']:.0f} | {ratio} |")
    targets = report["targets"]
    lines += [
        "",
        "## Targets",
        "",
        f"- transform >= {TRANSFORM_TARGET}x lightly (bilinear, same work): "
        f"{targets['transform_ratio']:.2f}x -> {'met' if targets['transform_met'] else 'MISSED'}",
        f"- masks >= {MASK_TARGET}x lightly's collator (per crop mask): "
        f"{targets['mask_ratio']:.1f}x -> {'met' if targets['mask_met'] else 'MISSED'}",
        "",
    ]
    return "\n".join(lines)


def machine_info() -> dict:
    """The CPU model, versions, core count and the load average now (call after
    ``torch.set_num_threads``)."""
    import lightly

    machine = {"cpu": platform.processor() or platform.machine(),
               "python": platform.python_version(), "torch": torch.__version__,
               "lightly": lightly.__version__, "threads": torch.get_num_threads(),
               "cores": os.cpu_count(), "load_average_1m_at_start": os.getloadavg()[0]}
    with contextlib.suppress(OSError, StopIteration):
        machine["cpu"] = next(line.split(":", 1)[1].strip() for line in
                              Path("/proc/cpuinfo").read_text().splitlines()
                              if line.startswith("model name"))
    return machine


def save_report(out: Path, stem: str, report: dict, text: str) -> None:
    """Writes ``out/stem.json`` and ``out/stem.md`` and prints the markdown."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(text)
    print(text)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--mask-batch", type=int, default=256)
    parser.add_argument("--mask-repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    report = {
        "machine": machine_info(),
        "transform": bench_transform(args.images, args.batch_size, args.repeats),
        "masks": bench_masks(args.mask_batch, args.mask_repeats),
    }
    transform_ratio = report["transform"]["results"]["lightly_dino_bilinear"]["ours_over_lightly"]
    mask_ratio = report["masks"]["results"]["ours_multicrop_2_global"]["ours_over_lightly"]
    report["targets"] = {
        "transform_ratio": transform_ratio, "transform_met": transform_ratio >= TRANSFORM_TARGET,
        "mask_ratio": mask_ratio, "mask_met": mask_ratio >= MASK_TARGET,
    }
    save_report(args.out, "data", report, markdown(report))
    return report


if __name__ == "__main__":
    main()
