"""Quality benchmark: does multi-crop H-JEPA give better frozen features than single-crop?

Trains every variant under one fixed budget (same config, data subset, epochs, seed) through the
library (``hjepa_core.train.train``, tracking off), then evaluates each encoder with the same
protocol (``hjepa_core.eval.evaluate``: linear probe and weighted kNN on frozen, mean-pooled
features of fixed train/test subsets). Baselines: the same architecture with random weights,
and raw pixels. Writes ``<out>.json`` and ``<out>.md`` (default ``benchmarks/results/quality``).

    python benchmarks/quality/run_quality.py                               # the stated CPU budget
    python benchmarks/quality/run_quality.py --max_samples 256 --epochs 1 \\
        --eval_train 500 --eval_test 200 --out /tmp/quality_smoke            # wiring check

The seed claims +2-5% on downstream tasks from multi-crop (DINOv2-style); this script measures
the difference at the given budget and says whether it is larger than the noise of the test set.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from hjepa_core.config import load_config  # noqa: E402
from hjepa_core.eval import EvalSettings, evaluate  # noqa: E402
from hjepa_core.train import train  # noqa: E402

CONFIG = "configs/fashion_mnist.yaml"
VARIANTS: dict[str, list[str]] = {
    "multicrop/global_only": ["masking.strategy=global_only"],
    "multicrop/global_with_local_context": ["masking.strategy=global_with_local_context"],
    "multicrop/cross_crop_prediction": ["masking.strategy=cross_crop_prediction"],
    "single_crop (I-JEPA-like)": ["data.use_multicrop=false", "masking.strategy=global_only"],
}


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--data_path", default=None, help="folder holding Fashion-MNIST (default: the usual places)")
    p.add_argument("--max_samples", type=int, default=4096,
                   help="pretraining subset of Fashion-MNIST train (0: all 60000)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--eval_train", type=int, default=5000, help="train-split subset for probe/kNN features (0: all)")
    p.add_argument("--eval_test", type=int, default=2000, help="test-split subset for probe/kNN features (0: all)")
    p.add_argument("--num_workers", type=int, default=2)
    p.add_argument("--batch_size", type=int, default=None, help="default: the config's")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--work_dir", default="outputs/quality")
    p.add_argument("--out", default="benchmarks/results/quality", help="writes OUT.json and OUT.md")
    p.add_argument("--progress", action="store_true")
    return p.parse_args(argv)


def _overrides(args: argparse.Namespace, name: str) -> list[str]:
    safe = name.split(" ")[0].replace("/", "_")
    out = [*VARIANTS[name], f"data.max_samples={args.max_samples or 'null'}", f"training.epochs={args.epochs}",
           f"data.num_workers={args.num_workers}", f"training.seed={args.seed}", "tracking.enabled=false",
           f"training.device={args.device}", f"training.output_dir={args.work_dir}/{safe}",
           "training.checkpoint_every_steps=0"]
    if args.batch_size:
        out.append(f"training.batch_size={args.batch_size}")
    if args.data_path:
        out.append(f"data.data_path={args.data_path}")
    return out


def _se_diff(p: float, q: float, n: int) -> float:
    """Standard error of the difference of two accuracies on n test images (independent binomials)."""
    return math.sqrt((p * (1 - p) + q * (1 - q)) / n)


def _verdict(delta: float, se: float) -> str:
    if abs(delta) < 2 * se:
        return "no measurable difference (within 2 standard errors)"
    if delta >= 0.02:
        return "multi-crop better by at least the seed's +2 points"
    return "multi-crop better, by less than +2 points" if delta > 0 else "single-crop better"


def run(args: argparse.Namespace) -> dict[str, Any]:
    os.chdir(ROOT)
    rows: list[dict[str, Any]] = []
    baselines: dict[str, Any] = {}
    for i, name in enumerate(args.variants):
        overrides = _overrides(args, name)
        cfg = load_config(args.config, overrides)
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        result = train(cfg, progress=args.progress)
        train_s = time.perf_counter() - start
        settings = EvalSettings(max_train_samples=args.eval_train or None, max_test_samples=args.eval_test or None,
                                num_workers=args.num_workers,
                                baselines=i == 0, tracking=False, device=args.device, progress=args.progress,
                                output_dir=str(result.output_dir / "eval"),
                                cache_dir=str(Path(args.work_dir) / "feature_cache"))
        start = time.perf_counter()
        report = evaluate(result.encoder_path, settings)
        eval_s = time.perf_counter() - start
        m = report["metrics"]
        rows.append({
            "variant": name, "probe_top1": m["probe_top1"], "probe_top5": m["probe_top5"],
            "knn_top1": m["knn_top1"], "knn_top5": m["knn_top5"], "steps": result.steps,
            "final_loss": result.metrics.get("final_loss"), "train_seconds": round(train_s, 1),
            "eval_seconds": round(eval_s, 1), "load_avg_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "probe_lr": report["methods"]["encoder"]["probe"]["lr"],
            "probe_weight_decay": report["methods"]["encoder"]["probe"]["weight_decay"],
            "train_command": f"hjepa train --config {args.config} " + " ".join(overrides),
            "eval_command": " ".join([
                f"hjepa evaluate --checkpoint {result.encoder_path}",
                f"--max_train_samples {args.eval_train}" if args.eval_train else "",
                f"--max_test_samples {args.eval_test}" if args.eval_test else "",
                f"--num_workers {args.num_workers} --device {args.device} --no-tracking",
                "" if i == 0 else "--no-baselines"]).replace("  ", " ").strip(),
        })
        if i == 0:
            for key, label in (("random_init", "random init (same ViT)"), ("pixels", "raw pixels")):
                baselines[label] = {metric: m[f"{key}_{metric}"]
                                    for metric in ("probe_top1", "probe_top5", "knn_top1", "knn_top5")}
        print(json.dumps({**rows[-1], "baselines": baselines}), flush=True)
    return {"rows": rows, "baselines": baselines, "num_test": report["num_test"], "num_train": report["num_train"]}


def _comparison(result: dict[str, Any]) -> list[dict[str, Any]]:
    single = [r for r in result["rows"] if r["variant"].startswith("single_crop")]
    multi = [r for r in result["rows"] if r["variant"].startswith("multicrop")]
    out = []
    if not single or not multi:
        return out
    for metric in ("probe_top1", "knn_top1"):
        s = single[0][metric]
        best = max(multi, key=lambda r: r[metric])
        mean = sum(r[metric] for r in multi) / len(multi)
        se = _se_diff(best[metric], s, result["num_test"])
        out.append({"metric": metric, "single_crop": s, "multicrop_mean": mean, "multicrop_best": best[metric],
                    "best_variant": best["variant"], "delta_mean": mean - s, "delta_best": best[metric] - s,
                    "se_of_difference": se, "verdict_mean": _verdict(mean - s, se),
                    "verdict_best": _verdict(best[metric] - s, se)})
    return out


def _markdown(meta: dict[str, Any], result: dict[str, Any], comparison: list[dict[str, Any]]) -> str:
    def pct(v: float) -> str:
        return f"{100 * v:.2f}"

    b = meta["budget"]
    lines = [
        "# Quality benchmark: multi-crop H-JEPA vs single-crop, random init and raw pixels",
        "",
        f"- dataset: Fashion-MNIST (Debian `dataset-fashion-mnist`); pretraining on "
        f"{'a fixed random subset of ' + str(b['max_samples']) if b['max_samples'] else 'all 60000'} training "
        f"images, {b['epochs']} epoch(s), seed {b['seed']}",
        f"- model: `{meta['config']}` (ViT embed 128, depth 4, 4 heads, patch 4, 32 px global / 16 px local "
        "crops, predictor 64x2), batch size and schedule from that config",
        f"- evaluation: frozen target encoder, mean-pooled tokens; linear probe (standardised features, "
        "SGD + cosine, 30 epochs, lr x wd swept on 10% of train) and weighted kNN (k=20, T=0.07) on fixed "
        f"subsets: {result['num_train']} train / {result['num_test']} test images",
        f"- machine: {meta['machine']}; device `{b['device']}`; total wall time {meta['total_seconds'] / 60:.1f} min",
        "",
        "| variant | probe top-1 | probe top-5 | kNN top-1 | kNN top-5 | steps | final loss | train s | eval s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['variant']} | {pct(r['probe_top1'])} | {pct(r['probe_top5'])} | {pct(r['knn_top1'])} | "
                     f"{pct(r['knn_top5'])} | {r['steps']} | {r['final_loss']:.4f} | {r['train_seconds']:.0f} | "
                     f"{r['eval_seconds']:.0f} |")
    for label, m in result["baselines"].items():
        lines.append(f"| {label} | {pct(m['probe_top1'])} | {pct(m['probe_top5'])} | {pct(m['knn_top1'])} | "
                     f"{pct(m['knn_top5'])} | - | - | - | - |")
    lines += ["", "## Multi-crop minus single-crop", "",
              "| metric | single-crop | multi-crop mean (3 strategies) | best multi-crop | delta mean (pp) | "
              "delta best (pp) | SE of a difference (pp) | verdict (mean) |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for c in comparison:
        lines.append(f"| {c['metric']} | {pct(c['single_crop'])} | {pct(c['multicrop_mean'])} | "
                     f"{pct(c['multicrop_best'])} ({c['best_variant'].split('/')[-1]}) | "
                     f"{100 * c['delta_mean']:+.2f} | {100 * c['delta_best']:+.2f} | "
                     f"{100 * c['se_of_difference']:.2f} | {c['verdict_mean']} |")
    loads = [x for r in result["rows"] for x in r.get("load_avg_1min", [])]
    lines += ["", "The standard error counts only test-set sampling (binomial); run-to-run variation of "
              "pretraining (seeds) is not measured here and adds to it. One seed per variant."]
    if loads:
        lines += ["", f"Wall times are on shared CPUs: the 1-minute load average ranged {min(loads):.1f}-"
                  f"{max(loads):.1f} during the run, so compare them loosely."]
    lines += ["",
              "## Commands", "", "```",
              f"python benchmarks/quality/run_quality.py {meta['argv']}".rstrip(), "```", "",
              "Each variant is equivalent to:", "", "```"]
    for r in result["rows"]:
        lines += [r["train_command"], r["eval_command"]]
    lines += ["```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    start = time.perf_counter()
    result = run(args)
    total = time.perf_counter() - start
    device = args.device
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
    if device.startswith("cuda") and torch.cuda.is_available():
        machine += f", {torch.cuda.get_device_name()}"
    meta = {"config": args.config, "machine": machine, "total_seconds": round(total, 1),
            "argv": " ".join(sys.argv[1:] if argv is None else argv),
            "budget": {"max_samples": args.max_samples, "epochs": args.epochs, "eval_train": args.eval_train,
                       "eval_test": args.eval_test, "seed": args.seed, "device": device,
                       "num_workers": args.num_workers}}
    comparison = _comparison(result)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({**meta, **result, "comparison": comparison}, indent=2))
    out.with_suffix(".md").write_text(_markdown(meta, result, comparison))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
