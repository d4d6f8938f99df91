"""Photo-JPEG loader benchmark: our multi-crop shard loader against lightly's DINOTransform.

Real users shard JPEG photos of around 500 x 375. This writes photo-like synthetic JPEGs
(smooth colour fields, shapes with edges, blur, sensor-like noise; quality 90) into real
WebDataset shards with ``write_shards`` (stored byte for byte), then times one pass over the
shards for each pipeline in one process, one thread (``torch.set_num_threads(1)``,
``num_workers=0``): images/s per core. Passes are interleaved, the median is reported.

Pipelines (2 x 224 + 6 x 96 crops, scales (0.4, 1) / (0.05, 0.4), flip 0.5, colour jitter
0.4/0.4/0.2/0.1 with p 0.8, ImageNet normalisation; batches of ``--batch-size``):

- ``ours_gpu_feed``: what a loader worker does when training on a GPU (the engine sets
  ``defer_photometric`` on CUDA): read the shard, decode (the cheapest decode the crops
  allow), crop, resize, flip, collate uint8 crops and make the batch's masks. Colour work runs
  on the GPU and is not timed here.
- ``ours_cpu``: the same plus the batched photometric pass on the CPU (what CPU training does;
  no masks): the same work as lightly's.
- ``ours_pil_decode``: ``ours_cpu`` with the previous decode path (PIL full decode to an RGB
  image, then ``sample_views``), to show what the decode change is worth.
- ``lightly_dino_bicubic`` / ``lightly_dino_bilinear``: the same shards read by our
  ``ShardSource`` (PIL decode), lightly's ``DINOTransform`` per image (bicubic as shipped;
  then with its crops switched to bilinear, as ours), views stacked per batch.

It also times the JPEG decoders alone on the same files (what ``EncodedImage.decode_pixels``
chooses between), counts at which scale the crops let each image be decoded, at 500 x 375 and
at a larger size, and profiles one ``ours_gpu_feed`` and one ``ours_cpu`` pass (cProfile, top
functions by own time).

    python benchmarks/bench_jpeg_loader.py            # writes benchmarks/results/jpeg_loader.{json,md}
    python benchmarks/bench_jpeg_loader.py --images 32 --repeats 1 --out /tmp/bench   # quick check
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from bench_data import dino_transform, interleaved, interleaved_times, machine_info, natural_images, save_report
from PIL import Image

from hjepa_core.data import MultiCropCollator, MultiCropTransform, build_multicrop_dataloader
from hjepa_core.data.images import EncodedImage, decode_image, pil_to_tensor
from hjepa_core.data.samples import MultiCropSample
from hjepa_core.data.shards import ShardMultiCropDataset, ShardSource, write_shards
from hjepa_core.masks import MultiCropMaskGenerator

TARGET_PER_CORE = 250.0  # images/s per core: 8 cores feed 2,000 images/s
PHOTO_SIZE = (500, 375)
LARGE_SIZE = (2048, 1536)
JPEG_QUALITY = 90


def write_photo_shards(root: Path, count: int, size: tuple[int, int], seed: int = 0) -> Path:
    """``count`` photo-like JPEGs (quality 90) in an image folder, written as shards."""
    folder = root / "photos"
    for i, image in enumerate(natural_images(count, *size, seed=seed)):
        path = folder / f"class_{i % 4}" / f"photo_{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, "JPEG", quality=JPEG_QUALITY)
    shards = root / "shards"
    write_shards(f"imagefolder:{folder}", shards, "train", image_format="jpeg",
                 samples_per_shard=max(1, count // 4), shuffle=True, progress=False)
    return shards


def _batched(items: Iterable, batch_size: int) -> Iterable[list]:
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def ours(shards: Path, batch_size: int, photometric: bool, masks: bool) -> Callable[[], int]:
    """One pass of our shard loader (``build_multicrop_dataloader``, ``num_workers=0``)."""
    dataset = ShardMultiCropDataset(shards, "train", resampled=False, transform=MultiCropTransform())
    dataset.set_epoch(0)
    generator = MultiCropMaskGenerator(global_crop_size=224, local_crop_size=96) if masks else None
    loader = build_multicrop_dataloader(dataset, batch_size, num_workers=0, drop_last=False,
                                        mask_generator=generator, defer_photometric=not photometric)

    def run() -> int:
        return sum(batch.batch_size for batch in loader)

    return run


def ours_pil_decode(shards: Path, batch_size: int) -> Callable[[], int]:
    """``ours_cpu`` with the previous decode: PIL image first, then ``sample_views``."""
    source = ShardSource(shards, "train")
    transform = MultiCropTransform()
    collate = MultiCropCollator(transform.photometric)

    def run() -> int:
        done = 0
        for batch in _batched(source.iter_with_index(), batch_size):
            samples = []
            for image, label, index in batch:
                views = transform.sample_views(image, torch.Generator().manual_seed(index))
                samples.append(MultiCropSample(views.crops, label, views.geometry, 2, index, index))
            done += collate(samples).batch_size
        return done

    return run


def lightly(shards: Path, batch_size: int, bilinear: bool) -> Callable[[], int]:
    """One pass of lightly's DINOTransform over the same shards (our PIL decode)."""
    source = ShardSource(shards, "train")
    transform = dino_transform(bilinear)

    def run() -> int:
        done = 0
        for batch in _batched(source, batch_size):
            views = [transform(image) for image, _ in batch]
            [torch.stack(group) for group in zip(*views, strict=True)]
            done += len(views)
        return done

    return run


def bench_decoders(files: list[Path], repeats: int) -> dict:
    """ms per image for each JPEG decoder on the same files (RGB pixels as a tensor)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    blobs = [path.read_bytes() for path in files]

    def pil_draft(data: bytes, scale: int) -> torch.Tensor:
        image = Image.open(io.BytesIO(data))
        image.draft("RGB", (image.size[0] // scale, image.size[1] // scale))
        return pil_to_tensor(image.convert("RGB"))

    runs = {
        "PIL full decode + array": lambda: [pil_to_tensor(decode_image(b).convert("RGB")) for b in blobs],
        "torchvision decode_jpeg": lambda: [
            decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8), mode=ImageReadMode.RGB)
            for b in blobs],
        "ours: EncodedImage header + decode_pixels (full size)": lambda: [
            EncodedImage(b).decode_pixels(1) for b in blobs],
        "PIL draft 1/2 + array": lambda: [pil_draft(b, 2) for b in blobs],
        "PIL draft 1/4 + array": lambda: [pil_draft(b, 4) for b in blobs],
    }
    seconds = interleaved(runs, repeats)
    return {name: 1e3 * statistics.median(times) / len(blobs) for name, times in seconds.items()}


def decode_scales(size: tuple[int, int], samples: int = 2000) -> dict[str, float]:
    """Fraction of images decoded at each scale: the crops are drawn first, and an image is
    decoded at 1/s only when every one of its 8 crops keeps its output size at 1/s."""
    transform = MultiCropTransform()
    counts = Counter(
        transform.max_decode_scale(transform.plan_views(*size, torch.Generator().manual_seed(i)))
        for i in range(samples))
    return {f"1/{s}": counts[s] / samples for s in sorted(counts)}


def profile(run: Callable[[], int], top: int = 12) -> list[dict]:
    """Top functions by own time over one pass."""
    profiler = cProfile.Profile()
    profiler.runcall(run)
    stats = pstats.Stats(profiler)
    total = sum(v[2] for v in stats.stats.values())  # type: ignore[attr-defined]
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]  # type: ignore[attr-defined]
    return [{"function": f"{Path(file).name}:{line}({name})", "calls": calls,
             "own_s": own, "own_share": own / total, "cumulative_s": cum}
            for (file, line, name), (_, calls, own, cum, _) in rows]


def _checked(name: str, run: Callable[[], int], expected: int) -> Callable[[], int]:
    def checked() -> int:
        if (done := run()) != expected:
            raise RuntimeError(f"{name} yielded {done} images, not {expected}")
        return done

    return checked


def bench_loader(shards: Path, n_images: int, batch_size: int, repeats: int) -> dict:
    runs: dict[str, Callable[[], int]] = {
        "ours_gpu_feed": ours(shards, batch_size, photometric=False, masks=True),
        "ours_cpu": ours(shards, batch_size, photometric=True, masks=False),
        "ours_pil_decode": ours_pil_decode(shards, batch_size),
        "lightly_dino_bicubic": lightly(shards, batch_size, bilinear=False),
        "lightly_dino_bilinear": lightly(shards, batch_size, bilinear=True),
    }
    runs = {name: _checked(name, run, n_images) for name, run in runs.items()}
    seconds = interleaved_times(runs, repeats)
    results = {
        name: {"images_per_cpu_s_median": n_images / statistics.median(times["cpu"]),
               "images_per_s_median": n_images / statistics.median(times["wall"]),
               "images_per_s_best": n_images / min(times["wall"]),
               "cpu_seconds_per_pass": times["cpu"], "wall_seconds_per_pass": times["wall"]}
        for name, times in seconds.items()
    }
    for key, ratio in (("images_per_cpu_s_median", "over_lightly_cpu"),
                       ("images_per_s_median", "over_lightly_wall")):
        reference = results["lightly_dino_bilinear"][key]
        for result in results.values():
            result[ratio] = result[key] / reference
    return {"results": results,
            "profile_ours_gpu_feed": profile(runs["ours_gpu_feed"]),
            "profile_ours_cpu": profile(runs["ours_cpu"])}


LABELS = {
    "ours_gpu_feed": "ours, GPU feed: shard read + decode + crops + uint8 collate + masks",
    "ours_cpu": "ours, CPU training: the same + batched photometric, no masks",
    "ours_pil_decode": "ours, CPU training, previous decode (PIL image, then crops)",
    "lightly_dino_bicubic": "lightly `DINOTransform` (bicubic, as shipped)",
    "lightly_dino_bilinear": "lightly `DINOTransform`, crops bilinear (same work as ours_cpu)",
}


def markdown(report: dict) -> str:
    machine, loader = report["machine"], report["loader"]["results"]
    busy = machine["load_average_1m_at_start"] >= 1.0  # another process held a core before this one started
    lines = [
        "# Photo-JPEG loader benchmark: ours vs lightly's DINOTransform",
        "",
        f"{report['images']}. One process, one thread (`num_workers=0`): images/s per core; "
        f"median of {report['repeats']} interleaved passes, timed by this process's CPU "
        "time (what the work costs a core it has to itself) and by the wall clock. / lightly: "
        "against lightly with bilinear crops (the same work as ours_cpu). Machine: "
        f"{machine['cpu']}, "
        f"{machine['cores']} cores{' **shared with other work**' if busy else ''} (load average "
        f"{machine['load_average_1m_at_start']:.1f} at start, "
        f"{machine['load_average_1m_at_end']:.1f} at end): trust the ratios more than the "
        "absolute numbers.",
        "",
        "| pipeline | images per CPU-second | / lightly | images/s wall-clock | / lightly |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, label in LABELS.items():
        r = loader[name]
        lines.append(f"| {label} | {r['images_per_cpu_s_median']:.1f} | {r['over_lightly_cpu']:.2f}x | "
                     f"{r['images_per_s_median']:.1f} | {r['over_lightly_wall']:.2f}x |")
    lines += ["", "JPEG decode alone, ms per image (RGB pixels as a tensor):", "",
              "| decoder | ms |", "|---|---:|"]
    lines += [f"| {name} | {ms:.2f} |" for name, ms in report["decoders_ms"].items()]
    lines += ["", "Scale each image is decoded at (crops drawn first; a reduced decode only "
              "where no crop is upsampled):", ""]
    for size, scales in report["decode_scales"].items():
        shares = ", ".join(f"{s}: {share:.0%}" for s, share in scales.items())
        lines.append(f"- {size}: {shares}")
    target = report["target"]
    lines += ["", f"Goal: >= {TARGET_PER_CORE:.0f} images per CPU-second for the GPU feed: "
              f"{target['gpu_feed']:.0f} -> {'met' if target['gpu_feed_met'] else 'MISSED'}; "
              f"CPU training path: {target['cpu']:.0f} -> "
              f"{'met' if target['cpu_met'] else 'missed'}.", ""]
    for name in ("profile_ours_gpu_feed", "profile_ours_cpu"):
        lines += [f"Profile, {name[8:]} (one pass, own time):", "", "| function | share |", "|---|---:|"]
        lines += [f"| `{row['function']}` | {row['own_share']:.0%} |"
                  for row in report["loader"][name][:8]]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)
    machine = machine_info()
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_photo_shards(Path(tmp), args.images, PHOTO_SIZE)
        jpeg_bytes = sum(p.stat().st_size for p in (Path(tmp) / "photos").rglob("*.jpg"))
        report = {
            "images": f"{args.images} photo-like {PHOTO_SIZE[0]}x{PHOTO_SIZE[1]} JPEGs (quality "
                      f"{JPEG_QUALITY}, {jpeg_bytes / args.images / 1024:.0f} KiB each) in "
                      f"WebDataset shards; batch {args.batch_size}",
            "repeats": args.repeats,
            "loader": bench_loader(shards, args.images, args.batch_size, args.repeats),
            "decoders_ms": bench_decoders(sorted((Path(tmp) / "photos").rglob("*.jpg"))[:64],
                                          args.repeats),
        }
    report["decode_scales"] = {f"{w}x{h}": decode_scales((w, h)) for w, h in (PHOTO_SIZE, LARGE_SIZE)}
    machine["load_average_1m_at_end"] = os.getloadavg()[0]
    report["machine"] = machine
    results = report["loader"]["results"]
    gpu = results["ours_gpu_feed"]["images_per_cpu_s_median"]
    cpu = results["ours_cpu"]["images_per_cpu_s_median"]
    report["target"] = {"per_core": TARGET_PER_CORE, "gpu_feed": gpu, "gpu_feed_met": gpu >= TARGET_PER_CORE,
                        "cpu": cpu, "cpu_met": cpu >= TARGET_PER_CORE}
    save_report(args.out, "jpeg_loader", report, markdown(report))
    return report


if __name__ == "__main__":
    main()
