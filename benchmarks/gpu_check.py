"""GPU check: training-step throughput, peak memory and MFU of H-JEPA multi-crop.

Measures ``vit_small`` and ``vit_base`` at the spec's 2 x 224 + 6 x 96 crops with bf16
autocast, eager and ``torch.compile``; then runs the real engine (``hjepa_core.train.train``)
for a few steps on CUDA on Fashion-MNIST so the CUDA data path (pinned memory, photometric
augmentation on the device) is exercised. Writes JSON (``--out``).

Model FLOPs are counted with ``torch.utils.flop_counter`` over one forward+backward;
MFU = FLOPs per step / step time / the device's dense bf16 peak (``--peak_tflops``).

    python benchmarks/gpu_check.py --out gpu_check.json            # on a GPU
    python benchmarks/gpu_check.py --smoke --out /tmp/smoke.json   # CPU wiring check
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from hjepa_core.config import load_config
from hjepa_core.data.multicrop_dataset import MultiCropBatch
from hjepa_core.data.multicrop_transforms import build_multicrop_transform
from hjepa_core.models import build_hjepa
from hjepa_core.models.layers import flop_counter
from hjepa_core.train.optim import build_optimizer

PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def synthetic_batches(config, batch_size: int, count: int, device: torch.device) -> list[MultiCropBatch]:
    """Random crops with valid geometry and real masks; photometric work done on the device."""
    mc = config.crops
    mask_generator = config.build_mask_generator(seed=0)
    transform_photometric = build_multicrop_transform(
        num_global_crops=mc.num_global_crops, num_local_crops=mc.num_local_crops,
        global_crop_size=mc.global_crop_size, local_crop_size=mc.local_crop_size,
    ).photometric
    batches = []
    n_crops = mc.num_global_crops + mc.num_local_crops
    for i in range(count):
        sizes = [mc.global_crop_size] * mc.num_global_crops + [mc.local_crop_size] * mc.num_local_crops
        crops = [torch.randint(0, 256, (batch_size, 3, s, s), dtype=torch.uint8, device=device) for s in sizes]
        crops = transform_photometric(crops, mc.num_global_crops, torch.Generator().manual_seed(i))
        lo = torch.rand(n_crops, batch_size, 2) * 0.4
        boxes = torch.cat([lo, lo + 0.6], dim=-1)
        batches.append(MultiCropBatch(
            crops=crops, labels=torch.zeros(batch_size, dtype=torch.long, device=device),
            boxes=boxes.to(device), flips=(torch.rand(n_crops, batch_size) < 0.5).to(device),
            indices=torch.arange(batch_size), num_global_crops=mc.num_global_crops,
            masks=mask_generator(batch_size).to(device),
        ))
    return batches


def measure(encoder: str, batch_size: int, steps: int, compile_model: bool, device: torch.device,
            smoke: bool, peak_tflops: float | None) -> dict:
    overrides = [f"model.encoder={encoder}", "tracking.enabled=false"]
    if smoke:
        overrides += ["data.multicrop.global_crop_size=32", "data.multicrop.local_crop_size=16",
                      "model.patch_size=4", "masking.num_target_masks=2"]
    config = load_config("configs/multicrop_training.yaml", overrides)
    torch.manual_seed(0)
    model = build_hjepa(config).to(device)
    optimizer = build_optimizer(model, 1e-4)
    if compile_model:
        model.encoder.compile()
        model.predictor.compile()
    batches = synthetic_batches(config, batch_size, 4, device)
    amp = device.type == "cuda"

    def step(batch: MultiCropBatch) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            out = model(batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        model.update_target(0.996)
        return out.loss

    compile_start = time.perf_counter()
    for i in range(3):
        step(batches[i % len(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize()
    warmup_s = time.perf_counter() - compile_start
    flops = None
    if not compile_model:
        with flop_counter() as counter:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                loss = model(batches[0]).loss
            loss.backward()
        optimizer.zero_grad(set_to_none=True)
        flops = counter.get_total_flops()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(steps):
        loss = step(batches[i % len(batches)])
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    step_s = elapsed / steps
    result = {
        "encoder": encoder, "compile": compile_model, "batch_size": batch_size,
        "crops": "2x224+6x96" if not smoke else "2x32+6x16 (smoke)",
        "precision": "bf16" if amp else "fp32", "steps": steps, "warmup_s": round(warmup_s, 2),
        "step_ms": round(step_s * 1000, 2), "images_per_s": round(batch_size / step_s, 1),
        "loss": float(loss.detach()),
        "peak_memory_gb": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if amp else None,
        "model_tflops_per_step": round(flops / 1e12, 3) if flops else None,
    }
    if flops and peak_tflops:
        result["mfu"] = round(flops / step_s / (peak_tflops * 1e12), 3)
    return result


def engine_run(data_path: str | None, out_dir: Path, steps: int) -> dict:
    from hjepa_core.train import train

    overrides = ["tracking.enabled=false", f"training.max_steps={steps}", f"training.output_dir={out_dir}",
                 "data.num_workers=8", "training.batch_size=256", "data.max_samples=60000", "training.log_every=10"]
    if data_path:
        overrides.append(f"data.data_path={data_path}")
    config = load_config("configs/fashion_mnist.yaml", overrides)
    start = time.perf_counter()
    result = train(config, progress=False)
    rates = [h["images_per_s"] for h in result.metrics["history"] if "images_per_s" in h]
    return {"steps": result.steps, "final_loss": result.metrics["final_loss"],
            "wall_s": round(time.perf_counter() - start, 1), "images_per_s_last_window": rates[-1] if rates else None,
            "config": "configs/fashion_mnist.yaml, batch 256, 8 workers"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="benchmarks/results/gpu_check.json")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--budget_s", type=float, default=420.0, help="skip remaining cases after this")
    parser.add_argument("--data_path", default=None, help="folder with Fashion-MNIST files for the engine run")
    parser.add_argument("--peak_tflops", type=float, default=None)
    parser.add_argument("--smoke", action="store_true", help="tiny crops, eager only, CPU allowed")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    report = {"device": name, "torch": torch.__version__, "peak_bf16_tflops": peak, "cases": [], "skipped": []}
    start = time.perf_counter()
    compile_modes = (False,) if args.smoke else (False, True)
    cases = [(enc, comp) for comp in compile_modes for enc in ("vit_small", "vit_base")]
    for encoder, compile_model in cases:
        if time.perf_counter() - start > args.budget_s:
            report["skipped"].append(f"{encoder} compile={compile_model}: over --budget_s")
            continue
        try:
            case = measure(encoder, args.batch_size, args.steps if not args.smoke else 2, compile_model, device,
                           args.smoke, peak)
        except Exception as exc:  # a failing case (e.g. compile) must not lose the others
            case = {"encoder": encoder, "compile": compile_model, "error": f"{type(exc).__name__}: {exc}"}
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(json.dumps(case), flush=True)
        report["cases"].append(case)
    if not args.smoke and time.perf_counter() - start < args.budget_s + 60:
        try:
            report["engine"] = engine_run(args.data_path, Path("/tmp/gpu_check_engine"), 60)
        except Exception as exc:
            report["engine"] = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(report["engine"]), flush=True)
    report["total_s"] = round(time.perf_counter() - start, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
