"""Shard benchmark: writing shards vs plain ``tar``, and the multi-crop loader from shards vs
from an image folder, on the same Fashion-MNIST images.

1. Exports Fashion-MNIST training images as files (``root/<class>/<i>.png``): the image
   folder both sides read. Two settings: ``--num-images`` at the native 28 px as PNG (tiny
   files: per-sample overheads dominate), and ``--large-images`` upscaled to 160 px as JPEG
   (closer to real photos, whose bytes are kept as they are).
2. Sharding throughput (images/s): ``tar cf`` of that folder, against ``write_shards`` of
   ``imagefolder:ROOT`` (every file opened and fully decoded to validate it, original bytes
   stored, a JSON record per sample, fsync + rename per shard) with 1 and N processes, and of
   the in-memory ``fashion_mnist`` source (PNG encoding included).
3. Loader throughput (images/s through ``build_multicrop_dataloader``, the Fashion-MNIST
   config's crops: 2 x 32 px + 6 x 16 px, batch 64): the map-style image-folder dataset
   against the resampled shard stream, same transform, same workers; plus decode-only
   iteration of both sources in one process.

Writes ``benchmarks/results/shards.json`` and ``shards.md``. The numbers are wall-clock on
whatever CPUs the machine has (shared CPUs make them noisy): compare rows of one run.

    python benchmarks/bench_shards.py                    # ~3 minutes on 2 shared cores
    python benchmarks/bench_shards.py --num-images 1000 --large-images 0 --repeats 1  # quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from hjepa_core.data import build_multicrop_dataloader, build_multicrop_dataset, build_source
from hjepa_core.data.shards import ShardSource, write_shards
from hjepa_core.data.sources import load_fashion_mnist

CROPS = dict(num_global_crops=2, num_local_crops=6, global_crop_size=32, local_crop_size=16,
             global_crop_scale=(0.6, 1.0), local_crop_scale=(0.2, 0.6))
RESULTS = Path(__file__).resolve().parent / "results"


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (tar, encoding workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


@dataclass(frozen=True)
class Setting:
    """One image configuration: how many images, their side and file format."""

    num_images: int
    size: int  # 28 keeps Fashion-MNIST's native size
    image_format: str  # png | jpeg

    @property
    def label(self) -> str:
        return f"{self.num_images} Fashion-MNIST images, {self.size}x{self.size} {self.image_format.upper()}"


def export_folder(root: Path, setting: Setting) -> None:
    """Writes Fashion-MNIST training images as ``root/<class>/<i>.png|jpg`` (resized when asked)."""
    source = load_fashion_mnist(None, "train")
    ext = "png" if setting.image_format == "png" else "jpg"
    for i in range(setting.num_images):
        image, label = source[i]
        if setting.size != image.width:
            image = image.resize((setting.size, setting.size), Image.Resampling.BICUBIC)
        folder = root / f"{label:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:06d}.{ext}", quality=90) if ext == "jpg" else image.save(
            folder / f"{i:06d}.{ext}")


def folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def loader_rate(dataset, count: int, workers: int, batch_size: int) -> float:
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(0)
    loader = build_multicrop_dataloader(dataset, batch_size=batch_size, num_workers=workers)
    seen = 0
    start = time.perf_counter()
    for batch in loader:
        seen += batch.batch_size
        if seen >= count:
            break
    return seen / (time.perf_counter() - start)


def run(setting: Setting, shard_workers: int, loader_workers: int, batch_size: int, repeats: int) -> dict:
    num_images, image_format = setting.num_images, setting.image_format
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="bench_shards_"))
    try:
        root = work / "images"
        export_s, _ = timed(lambda: export_folder(root, setting))
        rows: list[dict] = []

        def best(name: str, fn: Callable[[], object], note: str = "") -> dict:
            walls, cpus = [], []
            for _ in range(repeats):
                cpu = cpu_seconds()
                walls.append(timed(fn)[0])
                cpus.append(cpu_seconds() - cpu)
            seconds = min(walls)
            row = {"method": name, "seconds": round(seconds, 3), "cpu_seconds": round(min(cpus), 3),
                   "images_per_s": round(num_images / seconds, 1), "note": note}
            rows.append(row)
            return row

        tar_path = work / "plain.tar"
        best("tar cf (image folder)", lambda: subprocess.run(
            ["tar", "cf", str(tar_path), "-C", str(root), "."], check=True), "copies bytes only")
        sizes = {"image_folder_bytes": folder_bytes(root), "plain_tar_bytes": tar_path.stat().st_size}
        for workers in sorted({1, shard_workers}):
            out = work / f"shards_{workers}"
            best(f"hjepa shard imagefolder, {workers} proc",
                 lambda out=out, workers=workers: write_shards(
                     f"imagefolder:{root}", out, "train", samples_per_shard=2000,
                     image_format=image_format, workers=workers, progress=False),
                 f"decode-validates every file, keeps the {image_format.upper()} bytes")
        if setting.size == 28:
            for workers in sorted({1, shard_workers}):
                out = work / f"fm_{workers}"
                best(f"hjepa shard fashion_mnist (in memory), {workers} proc",
                     lambda out=out, workers=workers: write_shards(
                         "fashion_mnist", out, "train", max_samples=num_images,
                         samples_per_shard=2000, workers=workers, progress=False),
                     "encodes PNG")
        shard_dir = work / "shards_1"
        sizes["shard_bytes"] = sum(p.stat().st_size for p in shard_dir.glob("*.tar"))
        shas = {w: json.loads((work / f"shards_{w}" / "manifest.json").read_text())
                for w in sorted({1, shard_workers})}
        identical = len({json.dumps([s["sha256"] for s in m["splits"]["train"]["shards"]])
                         for m in shas.values()}) == 1

        loaders: list[dict] = []
        folder_ds = build_multicrop_dataset("imagefolder", data_path=str(root), **CROPS)
        shard_ds = build_multicrop_dataset(f"shards:{shard_dir}", split="train",
                                           epoch_samples=num_images, **CROPS)
        for name, dataset in (("image folder (map-style)", folder_ds),
                              ("shards (resampled stream)", shard_ds)):
            rate = max(loader_rate(dataset, num_images, loader_workers, batch_size)
                       for _ in range(repeats))
            loaders.append({"source": name, "images_per_s": round(rate, 1),
                            "workers": loader_workers, "batch_size": batch_size})

        def decode_all(source) -> int:
            return sum(1 for _ in (source if isinstance(source, ShardSource) else
                                   (source[i] for i in range(len(source)))))

        for name, source in (("image folder: PIL decode, 1 process",
                              build_source("imagefolder", str(root))),
                             ("shards: stream + PIL decode, 1 process",
                              ShardSource(shard_dir, "train"))):
            seconds = min(timed(lambda source=source: decode_all(source))[0] for _ in range(repeats))
            loaders.append({"source": name, "images_per_s": round(num_images / seconds, 1),
                            "workers": 0, "batch_size": None})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "num_images": num_images,
        "image": setting.label,
        "export_seconds": round(export_s, 2),
        "sharding": rows,
        "sizes": sizes,
        "parallel_output_identical": identical,
        "loader": loaders,
        "crops": {k: list(v) if isinstance(v, tuple) else v for k, v in CROPS.items()},
        "load_average_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "torch": torch.__version__, "platform": platform.platform()},
    }


def markdown(results: list[dict]) -> str:
    machine = results[0]["machine"]
    lines = [
        "# Shards benchmark",
        "",
        f"{machine['cpus']} CPUs ({machine['platform']}, Python {machine['python']}, torch "
        f"{machine['torch']}). Best of the repeats; shared CPUs make absolute numbers noisy, so "
        "compare rows of one table. Regenerate with `python benchmarks/bench_shards.py`.",
        "",
    ]
    for result in results:
        lines += section(result)
    return "\n".join(lines)


def section(result: dict) -> list[str]:
    before, after = result["load_average_1min"]
    lines = [
        f"## {result['image']}",
        "",
        f"Load average (1 min) on the {result['machine']['cpus']} CPUs: {before} before, {after} "
        "after (other work on the machine).",
        "",
        "### Writing (images/s)",
        "",
        "| method | wall s | CPU s (all processes) | images/s | note |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    lines += [f"| {r['method']} | {r['seconds']} | {r['cpu_seconds']} | {r['images_per_s']} | "
              f"{r['note']} |" for r in result["sharding"]]
    sizes = result["sizes"]
    lines += [
        "",
        f"Bytes: image files {sizes['image_folder_bytes']:,}; plain tar {sizes['plain_tar_bytes']:,}; "
        f"shards {sizes['shard_bytes']:,} (3 tar members per sample: image, cls, json). "
        f"Output identical for 1 and N processes: {result['parallel_output_identical']}.",
        "",
        "### Reading (images/s)",
        "",
        "| source | workers | batch | images/s |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {r['source']} | {r['workers']} | {r['batch_size'] or '-'} | {r['images_per_s']} |"
              for r in result["loader"]]
    lines += ["", "Loader rows: multi-crop " + ", ".join(f"{k}={v}" for k, v in result["crops"].items())
              + "; photometric augmentation in the collate (CPU).", ""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-images", type=int, default=10_000, help="native 28 px PNG run")
    parser.add_argument("--large-images", type=int, default=2_000,
                        help="160 px JPEG run (0: skip)")
    parser.add_argument("--shard-workers", type=int, default=2)
    parser.add_argument("--loader-workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = [Setting(args.num_images, 28, "png")]
    if args.large_images:
        settings.append(Setting(args.large_images, 160, "jpeg"))
    results = [run(s, args.shard_workers, args.loader_workers, args.batch_size, args.repeats)
               for s in settings]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "shards.json").write_text(json.dumps({"results": results}, indent=2) + "\n")
    (args.out_dir / "shards.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
