"""Step cost of config variants relative to single-crop: what multi-crop costs per image.

Every variant is the real model, optimizer and loader of ``--config`` with its overrides: a few
batches are drawn from its own multi-crop loader up front (photometric work done, as the CPU
engine does), then one training step (forward under the config's autocast, backward, grad clip,
fused AdamW, EMA update; ``training.compile=true`` compiles the modules as the engine does) is
timed for each variant in turn, interleaved and in alternating order, so load changes on the
machine hit every variant alike. The cost is the median step time over the median single-crop
step time (the same batch size, so also the cost per image). The quality benchmark uses it to
give multi-crop variants the same compute as single-crop (``run_quality.py --budget_unit steps``).

    python benchmarks/bench_step_cost.py                       # the CLI's strategies vs single-crop
    python benchmarks/bench_step_cost.py --variant "small_locals=data.multicrop.local_crop_size=12"
    python benchmarks/bench_step_cost.py --variant "compiled=data.use_multicrop=false,training.compile=true"
    python benchmarks/bench_step_cost.py --steps 2 --warmup 1 --out /tmp/step_cost   # wiring check
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from hjepa_core.config import load_config
from hjepa_core.data.multicrop_dataset import MultiCropBatch, build_multicrop_dataloader, build_multicrop_dataset
from hjepa_core.models import build_hjepa
from hjepa_core.train.device import compile_modules
from hjepa_core.train.engine import autocast_dtype
from hjepa_core.train.optim import build_optimizer, set_schedule
from hjepa_core.utils import atomic_write_text, split_overrides

SINGLE = "single_crop"
DEFAULT_VARIANTS = {
    SINGLE: ["data.use_multicrop=false"],
    "global_only": ["masking.strategy=global_only"],
    "global_with_local_context": ["masking.strategy=global_with_local_context"],
    "cross_crop_prediction": ["masking.strategy=cross_crop_prediction"],
}
COMMON = ["tracking.enabled=false", "data.num_workers=0", "training.device=cpu", "data.max_samples=2048"]


class Variant:
    """One config's model, optimizer and pre-drawn batches, and its timed steps."""

    def __init__(self, name: str, config_path: str, overrides: list[str], batches: int) -> None:
        self.name = name
        self.overrides = overrides
        self.config = load_config(config_path, [*COMMON, *overrides])
        t = self.config.training
        torch.manual_seed(t.seed)
        dataset = build_multicrop_dataset(dataset_name=self.config.data.dataset, data_path=self.config.data.data_path,
                                          split="train", max_samples=self.config.data.max_samples,
                                          **dataclasses.asdict(self.config.crops))
        loader = build_multicrop_dataloader(dataset, batch_size=t.batch_size, num_workers=0, seed=t.seed,
                                            mask_generator=self.config.build_mask_generator())
        batches_iter = iter(loader)
        self.batches: list[MultiCropBatch] = [next(batches_iter) for _ in range(batches)]
        self.model = build_hjepa(self.config).train()
        if t.compile:  # as the engine does with training.compile=true; warm-up steps compile
            compile_modules(self.model, t.compile_backend)
        self.optimizer = build_optimizer(self.model, t.lr)
        set_schedule(self.optimizer, t.lr, t.weight_decay)
        self.amp_dtype = autocast_dtype(t.precision, torch.device("cpu"))
        self.times: list[float] = []

    def step(self, i: int) -> float:
        batch = self.batches[i % len(self.batches)]
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=self.amp_dtype or torch.float32, enabled=self.amp_dtype is not None):
            loss = self.model(batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.training.grad_clip or float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.update_target(self.config.training.ema_momentum)
        return time.perf_counter() - start


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, overrides = text.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"expected NAME=key=value,key=value; got {text!r}")
    return name, split_overrides(overrides)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/fashion_mnist.yaml")
    p.add_argument("--variant", type=parse_variant, action="append", default=[], metavar="NAME=OVERRIDES",
                   help="a variant besides single-crop (comma-separated overrides); default: the three strategies")
    p.add_argument("--steps", type=int, default=30, help="timed steps per variant (median)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batches", type=int, default=8, help="distinct batches per variant, cycled")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/step_cost", help="writes OUT.json and OUT.md")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    chosen = {SINGLE: DEFAULT_VARIANTS[SINGLE], **dict(args.variant)} if args.variant else DEFAULT_VARIANTS
    variants = [Variant(name, args.config, overrides, args.batches) for name, overrides in chosen.items()]
    for i in range(args.warmup):
        for v in variants:
            v.step(i)
    load_before = os.getloadavg()
    for j in range(args.steps):
        for v in variants if j % 2 == 0 else reversed(variants):
            v.times.append(v.step(args.warmup + j))
    load_after = os.getloadavg()

    single = statistics.median(variants[0].times)
    rows: list[dict[str, Any]] = [{
        "variant": v.name, "overrides": v.overrides, "step_s_median": statistics.median(v.times),
        "cost_vs_single": statistics.median(v.times) / single, "steps_s": v.times,
    } for v in variants]
    result = {"config": args.config, "batch_size": variants[0].config.training.batch_size, "threads": args.threads,
              "timed_steps": args.steps, "load_avg_before": load_before, "load_avg_after": load_after,
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__, "variants": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(result, indent=2) + "\n")
    lines = [f"Step cost vs single-crop, `{args.config}`, batch {result['batch_size']}, {args.threads} threads, "
             f"median of {args.steps} interleaved steps (load {load_before[0]:.1f} -> {load_after[0]:.1f})", "",
             "| variant | overrides | step (ms) | cost vs single |", "|---|---|---:|---:|"]
    lines += [f"| {r['variant']} | `{','.join(r['overrides'])}` | {1000 * r['step_s_median']:.0f} | "
              f"{r['cost_vs_single']:.2f}x |" for r in rows]
    atomic_write_text(out.with_suffix(".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
