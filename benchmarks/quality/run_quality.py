"""Quality benchmark that decides defaults: H-JEPA variants vs single-crop, lightly's I-JEPA and baselines.

Every trained variant gets the same wall-clock training budget (``training.time_budget_s``: the
run stops on the clock and its LR / weight-decay / EMA schedules follow elapsed / budget, so every
variant finishes its cosine), for each seed, and the same independent evaluation
(``independent_eval.py``: frozen encoder, mean-pooled patch tokens, L-BFGS logistic probe with the
weight decay picked on a hold-out, weighted kNN k=20 T=0.07, effective rank) of BOTH its target
(EMA) and context (online) encoder, on fixed Fashion-MNIST subsets.

Variants (``VARIANTS``: name -> config overrides on ``--config``; add more with ``--extra``):
each masking strategy with multi-crop, single-crop, lightly's I-JEPA (``lightly_ijepa.py``, same
sizes and schedules), and the budget-free baselines random init (same ViT, per seed) and raw pixels.

Results are cached per (variant, seed, budget) under ``--work_dir`` (a rerun with the same
arguments skips finished runs; a finished training is reused when only its evaluation is
missing or the evaluation settings changed). Writes ``OUT.json`` (every run, settings, machine, load averages, command),
``OUT.md`` (table per budget + verdict) and ``OUT.png`` (accuracy vs budget; bars for one budget).

    python benchmarks/quality/run_quality.py                                  # CPU: 180 s x 3 seeds
    python benchmarks/quality/run_quality.py --budgets 90 180 --seeds 0 1 2
    python benchmarks/quality/run_quality.py --extra "h2=masking.num_hierarchies=2,loss.hierarchy_weights=[1.0,0.5]"
    python benchmarks/quality/run_quality.py --budgets 10 --seeds 0 --eval_train 500 --eval_test 500 \\
        --work_dir /tmp/quality_smoke --out /tmp/quality_smoke/quality      # wiring check
    python benchmarks/quality/run_quality.py --device cuda                    # GPU profile (ViT-S)
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import independent_eval as ie
import lightly_ijepa
import torch
from tqdm.auto import tqdm

from hjepa_core.config import load_config
from hjepa_core.models.vit import build_encoder
from hjepa_core.train import train
from hjepa_core.train.checkpoint import list_checkpoints
from hjepa_core.utils import atomic_write_text, split_overrides

CONFIG = "configs/fashion_mnist.yaml"
SINGLE, LIGHTLY, RANDOM, PIXELS = "single_crop", "lightly_ijepa", "random_init", "raw_pixels"
VARIANTS: dict[str, list[str]] = {
    "global_only": ["masking.strategy=global_only"],
    "global_with_local_context": ["masking.strategy=global_with_local_context"],
    "cross_crop_prediction": ["masking.strategy=cross_crop_prediction"],
    SINGLE: ["data.use_multicrop=false"],
}
"""H-JEPA variants trained through the library: name -> config overrides."""
SPECIAL = (LIGHTLY, RANDOM, PIXELS)
# Keep the config's epochs: with a time budget they only set the warmup fraction (warmup_epochs / epochs).
COMMON = ["tracking.enabled=false", "training.checkpoint_every_steps=0", "training.keep_last_checkpoints=1",
          "data.max_samples=null"]
PROFILES: dict[str, dict[str, Any]] = {
    "cpu": {"overrides": ["training.device=cpu"], "budgets": [180.0], "threads": 2, "eval_batch": 500},
    "cuda": {  # ViT-S/4 on all 60k images at 32 px; bf16 autocast (training.precision=auto)
        "overrides": ["training.device=cuda", "training.precision=auto", "model.encoder=vit_small",
                      "model.embed_dim=384", "model.depth=12", "model.num_heads=6",
                      "model.predictor_embed_dim=192", "model.predictor_depth=6", "model.predictor_num_heads=6",
                      "training.batch_size=256", "data.num_workers=8", "data.pin_memory=true"],
        "budgets": [600.0, 1800.0], "threads": 8, "eval_batch": 2000,
    },
}
METRICS = (("probe_top1", "probe"), ("knn_top1", "kNN"))
SPECIAL_NOTES = {
    LIGHTLY: "lightly's I-JEPA modules, same ViT / predictor sizes, batch, lr, wd, warmup fraction and EMA "
             "schedules as the config, lightly's IJEPATransform (crop scale 0.3-1) and IJEPAMaskCollator "
             "(`lightly_ijepa.py`)",
    RANDOM: "the config's ViT as `build_encoder` initialises it (seeded), not trained",
    PIXELS: "the normalised 32x32 grayscale image (one channel), flattened",
}


def parse_extra(text: str) -> tuple[str, list[str]]:
    """``NAME=key=value,key=value`` -> (NAME, overrides); commas inside values like ``[1.0,0.5]`` are kept."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise argparse.ArgumentTypeError(f"--extra {text!r}: expected NAME=key=value[,key=value...]")
    return name, split_overrides(rest)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options (see the module docstring)."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=CONFIG)
    p.add_argument("--device", choices=sorted(PROFILES), default="cpu", help="profile: overrides and defaults")
    p.add_argument("--budgets", type=float, nargs="+", default=None, help="training seconds (default: profile's)")
    p.add_argument("--budget_unit", choices=("seconds", "steps"), default="seconds",
                   help="steps: each budget is a step count (schedules follow steps; a variant may set its own "
                        "training.max_steps to match a measured step cost) -- a screen that a loaded machine "
                        "cannot skew; decide defaults in seconds on a quiet machine")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--variants", nargs="+", default=None, help=f"subset of {[*VARIANTS, *SPECIAL]} and --extra names")
    p.add_argument("--extra", type=parse_extra, action="append", default=[], metavar="NAME=OVERRIDES",
                   help="add an H-JEPA variant: NAME=key=value,key=value (repeatable)")
    p.add_argument("--override", nargs="*", default=[], help="config overrides for every trained variant")
    p.add_argument("--eval_train", type=int, default=10_000, help="train-split images for probe/kNN/rank")
    p.add_argument("--eval_test", type=int, default=10_000, help="test-split images for probe/kNN")
    p.add_argument("--eval_batch", type=int, default=None, help="feature extraction batch (default: profile's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: profile's)")
    p.add_argument("--data_path", default=None, help="folder with Fashion-MNIST (default: the usual places)")
    p.add_argument("--work_dir", default="outputs/quality", help="runs and the per-run result cache")
    p.add_argument("--out", default="benchmarks/results/quality", help="writes OUT.json, OUT.md, OUT.png")
    p.add_argument("--progress", action="store_true", help="show each training's own progress bar")
    args = p.parse_args(argv)
    profile = PROFILES[args.device]
    args.budgets = args.budgets or profile["budgets"]
    args.eval_batch = args.eval_batch or profile["eval_batch"]
    args.threads = args.threads or profile["threads"]
    args.all_variants = {**VARIANTS, **dict(args.extra)}
    if args.budget_unit == "steps" and LIGHTLY in (args.variants or []):
        p.error("lightly_ijepa trains on a time budget only; leave it out with --budget_unit steps")
    names = args.variants or [*args.all_variants, *SPECIAL]
    if args.budget_unit == "steps":
        names = [n for n in names if n != LIGHTLY]
    unknown = [n for n in names if n not in args.all_variants and n not in SPECIAL]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {[*args.all_variants, *SPECIAL]} or add them with --extra")
    args.variants = names
    return args


@dataclasses.dataclass
class Run:
    """One (variant, seed, budget) unit of work; budget-free baselines use budget 0."""

    variant: str
    seed: int
    budget: float
    overrides: list[str]

    @property
    def kind(self) -> str:
        return self.variant if self.variant in SPECIAL else "hjepa"

    def train_key(self, args: argparse.Namespace) -> dict[str, Any]:
        """Everything the training depends on."""
        unit = {"budget_unit": "steps"} if args.budget_unit == "steps" else {}  # seconds: keys stay as before
        return {"variant": self.variant, "kind": self.kind, "seed": self.seed, "budget": self.budget, **unit,
                "overrides": self.overrides, "config": args.config,
                "config_sha256": hashlib.sha256(Path(args.config).read_bytes()).hexdigest()}

    def key(self, args: argparse.Namespace) -> dict[str, Any]:
        """Everything the result depends on: the training and the evaluation settings."""
        return {**self.train_key(args), "eval": dataclasses.asdict(eval_settings(args))}

    def slug(self, args: argparse.Namespace, train_only: bool = False) -> str:
        """File-name stem: variant, seed, budget and a digest of the (training) key."""
        key = self.train_key(args) if train_only else self.key(args)
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
        return f"{re.sub(r'[^A-Za-z0-9_.-]', '_', self.variant)}-s{self.seed}-b{self.budget:g}-{digest}"


def eval_settings(args: argparse.Namespace) -> ie.EvalSettings:
    """The independent evaluation's settings for these arguments."""
    crop = load_config(args.config, []).data.multicrop.global_crop_size
    return ie.EvalSettings(num_train=args.eval_train, num_test=args.eval_test, crop_size=crop,
                           batch_size=args.eval_batch, data_path=args.data_path,
                           device="cuda" if args.device == "cuda" else "cpu")


def plan(args: argparse.Namespace) -> list[Run]:
    """All runs, seed-major so an interrupted benchmark has whole seeds (every budget) done first."""
    base = [*COMMON, *PROFILES[args.device]["overrides"], *args.override]
    if args.data_path:
        base.append(f"data.data_path={args.data_path}")
    runs = [Run(PIXELS, 0, 0.0, [])] if PIXELS in args.variants else []
    for seed in args.seeds:
        if RANDOM in args.variants:
            runs.append(Run(RANDOM, seed, 0.0, base))
        for budget in args.budgets:
            for name in args.variants:
                if name in args.all_variants:
                    runs.append(Run(name, seed, budget, [*base, *args.all_variants[name]]))
                elif name == LIGHTLY:
                    runs.append(Run(name, seed, budget, base))
    return runs


def _train_config(run: Run, args: argparse.Namespace, run_dir: Path) -> Any:
    if args.budget_unit == "steps":  # 100 epochs never end first; warmup stays 20% of the steps
        budget = ["training.time_budget_s=null", "training.epochs=100", "training.warmup_epochs=20",
                  f"training.max_steps={int(run.budget)}", *run.overrides]
    else:
        budget = [*run.overrides, f"training.time_budget_s={run.budget}"]
    return load_config(args.config, [*budget, f"training.seed={run.seed}", f"training.output_dir={run_dir}"])


def _train(run: Run, args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """Trains one run (reusing a finished training in ``run_dir``) and returns its training summary."""
    done = run_dir / "benchmark_train.json"
    if done.is_file():
        return json.loads(done.read_text())
    shutil.rmtree(run_dir, ignore_errors=True)  # a cut-off training is redone from scratch
    config = _train_config(run, args, run_dir)
    if run.kind == LIGHTLY:
        metrics = lightly_ijepa.train_lightly(config, run.budget, run.seed, run_dir, progress=args.progress)
    else:
        train(config, progress=args.progress)
        metrics = json.loads((run_dir / "metrics.json").read_text())
        if metrics.get("preempted"):  # stopped by a signal: not the budget's training, never cached
            raise SystemExit(f"{run.variant} seed {run.seed}: training was pre-empted at step {metrics['steps']}")
    summary = {k: metrics.get(k) for k in ("images_seen", "train_seconds", "steps", "final_loss")}
    summary["multicrop"] = run.kind == "hjepa" and config.data.use_multicrop
    atomic_write_text(done, json.dumps(summary, indent=2))
    return summary


def execute(run: Run, args: argparse.Namespace, images: ie.EvalImages) -> dict[str, Any]:
    """Trains (if needed) and evaluates one run; returns its result record."""
    settings = eval_settings(args)
    device = settings.device
    load_start = os.getloadavg()
    start = time.perf_counter()
    record: dict[str, Any] = {"variant": run.variant, "kind": run.kind, "seed": run.seed, "budget": run.budget,
                              "overrides": run.overrides}
    if run.kind == PIXELS:
        record["target"] = ie.evaluate_pixels(images, settings)
    elif run.kind == RANDOM:
        torch.manual_seed(run.seed)
        encoder = build_encoder(load_config(args.config, run.overrides).model).requires_grad_(False).eval()
        record["target"] = ie.evaluate_tokens(encoder.to(device), images, settings)
    else:
        run_dir = Path(args.work_dir) / "runs" / run.slug(args, train_only=True)  # shared by eval settings
        record.update(_train(run, args, run_dir), run_dir=str(run_dir))
        record["images_per_s"] = record["images_seen"] / max(record["train_seconds"], 1e-9)
        eval_start = time.perf_counter()
        for which in ("target", "context"):
            if run.kind == LIGHTLY:
                tokens = lightly_ijepa.lightly_tokens(run_dir, which, device)
            elif which == "target":
                tokens = ie.hjepa_tokens(run_dir / "encoder.pt", "target", device)
            else:
                tokens = ie.hjepa_tokens(list_checkpoints(run_dir / "checkpoints")[-1], "context", device)
            record[which] = ie.evaluate_tokens(tokens, images, settings)
        record["eval_seconds"] = time.perf_counter() - eval_start
    record["wall_seconds"] = time.perf_counter() - start
    record["loadavg_start"], record["loadavg_end"] = list(load_start), list(os.getloadavg())
    return record


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(records: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Per budget and variant: seeds, mean/std of each metric per encoder, images seen, step-cost ratio."""
    out: dict[str, dict[str, Any]] = {}
    for budget in args.budgets:
        rows: dict[str, Any] = {}
        for name in args.variants:
            recs = [r for r in records if r["variant"] == name and (r["budget"] in (budget, 0.0))]
            if not recs:
                continue
            row: dict[str, Any] = {"seeds": [r["seed"] for r in recs], "multicrop": bool(recs[0].get("multicrop"))}
            for which in ("target", "context"):
                if all(which in r for r in recs):
                    row[which] = {m: _mean_std([r[which][m] for r in recs])
                                  for m in ("probe_top1", "knn_top1", "effective_rank")}
            if "images_seen" in recs[0]:
                row["images_seen"] = statistics.fmean(r["images_seen"] for r in recs)
                row["images_per_s"] = statistics.fmean(r["images_per_s"] for r in recs)
            rows[name] = row
        single = rows.get(SINGLE, {}).get("images_per_s")
        for row in rows.values():
            if single and "images_per_s" in row:
                row["step_cost_vs_single"] = single / row["images_per_s"]
        out[f"{budget:g}"] = rows
    return out


def _best(row: dict[str, Any], metric: str) -> tuple[str, float, float]:
    """(encoder, mean, std) of the row's better encoder on ``metric``."""
    which = max((w for w in ("target", "context") if w in row), key=lambda w: row[w][metric][0])
    return (which, *row[which][metric])


def verdict(summary: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each multi-crop variant vs single-crop and lightly, per metric (better encoder of each side)."""
    out = []
    for budget, rows in summary.items():
        for name, row in rows.items():
            if not row["multicrop"]:
                continue
            for ref in (SINGLE, LIGHTLY):
                if ref not in rows:
                    continue
                for metric, label in METRICS:
                    enc, mean, std = _best(row, metric)
                    ref_enc, ref_mean, ref_std = _best(rows[ref], metric)
                    delta, noise = mean - ref_mean, max(std, ref_std)
                    seeds = min(len(row["seeds"]), len(rows[ref]["seeds"]))
                    out.append({"budget": budget, "variant": name, "reference": ref, "metric": label,
                                "encoder": enc, "reference_encoder": ref_enc, "delta": delta, "noise_std": noise,
                                "seeds": seeds, "exceeds_std": seeds > 1 and abs(delta) > noise,
                                "better": seeds > 1 and delta > noise})
    return out


def _pm(stat: tuple[float, float] | None, scale: float = 100.0, digits: int = 1) -> str:
    if stat is None:
        return "–"
    return f"{stat[0] * scale:.{digits}f} ± {stat[1] * scale:.{digits}f}"


def markdown(result: dict[str, Any]) -> str:
    """The report: settings, one table per budget, the verdict, the command."""
    s, ev = result["settings"], result["settings"]["eval"]
    unit = "steps" if s.get("budget_unit") == "steps" else "s"
    decays = ", ".join(f"{w:.0e}" for w in ev["weight_decays"])
    lines = [
        f"# Quality benchmark: H-JEPA variants at equal {'steps' if unit == 'steps' else 'wall-clock'}",
        "",
        f"- config `{s['config']}`, profile `{s['device']}`, overrides for all: `{' '.join(s['common_overrides'])}`",
        f"- budgets (training {s.get('budget_unit', 'seconds')}): {', '.join(f'{b:g}' for b in s['budgets'])}; "
        f"seeds {s['seeds']} (mean ± std over seeds)",
        f"- evaluation (independent_eval.py): {ev['num_train']} train / {ev['num_test']} test Fashion-MNIST "
        f"images at {ev['crop_size']} px; mean-pooled patch tokens; L-BFGS logistic probe on standardised "
        f"features, weight decay from {decays} picked on a {ev['holdout_fraction']:.0%} hold-out; "
        f"weighted kNN k={ev['knn_k']}, cosine, T={ev['knn_temperature']}; effective rank (RankMe) on "
        f"{min(ev['num_train'], ev['rank_samples'])} train features",
        f"- machine: {result['machine']['summary']}; load average (1 min) {result['loadavg_start'][0]:.2f} at start, "
        f"{result['loadavg_end'][0]:.2f} at end; total {result['total_seconds'] / 60:.1f} min",
        "",
        "Step cost ratio = images/s of single-crop / images/s of the variant, images/s = images seen / training "
        "seconds (data-loader start-up included, as in the budget). Random init and raw pixels do not train "
        "(the same numbers at every budget).",
    ]
    for budget, rows in result["summary"].items():
        lines += ["", f"## Budget {budget} {unit}", "",
                  "| variant | images seen | step cost vs single-crop | target probe | target kNN | target eff. rank "
                  "| context probe | context kNN | context eff. rank |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, row in rows.items():
            cells = [name, f"{row['images_seen']:,.0f}" if "images_seen" in row else "–",
                     f"{row['step_cost_vs_single']:.2f}x" if "step_cost_vs_single" in row else "–"]
            for which in ("target", "context"):
                m = row.get(which)
                cells += [_pm(m and m["probe_top1"]), _pm(m and m["knn_top1"]),
                          _pm(m and m["effective_rank"], 1.0)]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Verdict", "",
              "Each multi-crop variant against single-crop and lightly's I-JEPA, on the better encoder of each "
              "(T = target, C = context). Delta in points; it counts when it exceeds the larger of the two seed stds.",
              "", "| budget | variant | vs | metric | delta | seed std | verdict |", "|---:|---|---|---|---:|---:|---|"]
    for v in result["verdict"]:
        word = ("better" if v["better"] else "worse" if v["exceeds_std"] else "within noise") if v["seeds"] > 1 \
            else "no std (1 seed)"
        lines.append(f"| {v['budget']} | {v['variant']} ({v['encoder'][0].upper()}) | {v['reference']} "
                     f"({v['reference_encoder'][0].upper()}) | {v['metric']} | {100 * v['delta']:+.2f} | "
                     f"{100 * v['noise_std']:.2f} | {word} |")
    if not result["verdict"]:
        lines.append("| – | (needs a multi-crop variant and single_crop or lightly_ijepa) | | | | | |")
    lines += ["", "## Variants", ""]
    lines += [f"- `{name}`: " + (f"`{' '.join(ov)}`" if ov else SPECIAL_NOTES.get(name, "the config as is"))
              for name, ov in s["variants"].items()]
    lines += ["", "## Command", "", "```", result["command"], "```", ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """Probe and kNN (mean ± std over seeds) vs budget per variant; grouped bars for a single budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = result["summary"]
    unit = "steps" if result["settings"].get("budget_unit") == "steps" else "s"
    budgets = [float(b) for b in summary]
    names = list(next(iter(summary.values())))
    fig, axes = plt.subplots(1, 2, figsize=(15, 5), constrained_layout=True)
    for ax, (metric, label) in zip(axes, METRICS, strict=True):
        if len(budgets) == 1:
            rows = summary[next(iter(summary))]
            for j, which in enumerate(("target", "context")):
                xs = [i + (j - 0.5) * 0.38 for i, n in enumerate(names) if which in rows[n]]
                stats = [rows[n][which][metric] for n in names if which in rows[n]]
                ax.bar(xs, [100 * m for m, _ in stats], 0.38, yerr=[100 * sd for _, sd in stats], capsize=3,
                       label=f"{which} encoder")
            ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
            low = min(100 * (rows[n][w][metric][0] - rows[n][w][metric][1]) for n in names for w in rows[n]
                      if w in ("target", "context"))
            ax.set_ylim(bottom=max(0.0, low - 5))
            ax.set_title(f"{label} top-1 at {budgets[0]:g} {unit}")
        else:
            for i, name in enumerate(names):
                color = f"C{i % 10}"
                for which, style in (("target", "-"), ("context", "--")):
                    pts = [(b, summary[f"{b:g}"][name][which][metric]) for b in budgets
                           if which in summary[f"{b:g}"].get(name, {})]
                    if "images_seen" not in summary[f"{budgets[0]:g}"].get(name, {}) and pts:
                        ax.axhline(100 * pts[0][1][0], color=color, ls=":", label=f"{name}")
                    elif pts:
                        ax.errorbar([b for b, _ in pts], [100 * m for _, (m, _) in pts],
                                    yerr=[100 * sd for _, (_, sd) in pts], color=color, ls=style, marker="o",
                                    capsize=3, label=f"{name} ({which})")
            ax.set_xlabel(f"training budget ({unit})")
            ax.set_title(f"{label} top-1 vs budget (solid: target, dashed: context encoder)")
        ax.set_ylabel(f"{label} top-1 (%)")
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="outside right upper", fontsize=7)
    fig.suptitle(f"Fashion-MNIST, independent eval, mean ± std over seeds {result['settings']['seeds']}")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _machine(args: argparse.Namespace) -> dict[str, Any]:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "lightly": __import__("lightly").__version__, "threads": args.threads}
    if args.device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    info["summary"] = (f"{info['platform']}, {info['cpu_count']} CPUs, torch {info['torch']}, "
                       f"{args.threads} threads" + (f", {info['gpu']}" if "gpu" in info else ""))
    return info


def main(argv: list[str] | None = None) -> int:
    """Runs (or resumes) the benchmark and writes the JSON, markdown and PNG."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started, load_start = time.perf_counter(), os.getloadavg()
    cache = Path(args.work_dir) / "results"
    cache.mkdir(parents=True, exist_ok=True)
    images = ie.load_eval_images(eval_settings(args), Path(args.work_dir))
    runs = plan(args)
    records = []
    bar = tqdm(runs, desc="quality runs", dynamic_ncols=True)
    for run in bar:
        bar.set_postfix_str(f"{run.variant} seed {run.seed} budget {run.budget:g}")
        path = cache / f"{run.slug(args)}.json"
        if path.is_file():
            record = {**json.loads(path.read_text()), "cached": True}
        else:
            record = {**execute(run, args, images), "key": run.key(args)}
            atomic_write_text(path, json.dumps(record, indent=2))
        records.append(record)
        t = record["target"]
        unit = "" if args.budget_unit == "steps" else "s"
        seen = f"{record['images_seen']:,}" if "images_seen" in record else "-"
        bar.write(f"{run.variant:28s} seed {run.seed} budget {run.budget:>5g}{unit} images {seen:>9s} "
                  f"probe {100 * t['probe_top1']:.2f} kNN {100 * t['knn_top1']:.2f} (target)"
                  + (f" / probe {100 * record['context']['probe_top1']:.2f} kNN "
                     f"{100 * record['context']['knn_top1']:.2f} (context)" if "context" in record else "")
                  + (" [cached]" if record.get("cached") else ""))
    summary = summarize(records, args)
    result = {
        "command": shlex.join([sys.executable, *(sys.argv if argv is None else ["run_quality.py", *argv])]),
        "settings": {"config": args.config, "device": args.device, "budgets": args.budgets,
                     "budget_unit": args.budget_unit, "seeds": args.seeds,
                     "variants": {n: args.all_variants.get(n, []) for n in args.variants},
                     "common_overrides": [*COMMON, *PROFILES[args.device]["overrides"], *args.override],
                     "eval": dataclasses.asdict(eval_settings(args)), "work_dir": args.work_dir,
                     "lightly": {"context_scale": lightly_ijepa.CONTEXT_SCALE,
                                 "target_scale": lightly_ijepa.TARGET_SCALE, "crop_scale": lightly_ijepa.CROP_SCALE}},
        "machine": _machine(args), "loadavg_start": list(load_start), "loadavg_end": list(os.getloadavg()),
        "total_seconds": time.perf_counter() - started, "runs": records, "summary": summary,
        "verdict": verdict(summary),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out.with_suffix(".json"), json.dumps(result, indent=2, default=str))
    atomic_write_text(out.with_suffix(".md"), markdown(result))
    plot(result, out.with_suffix(".png"))
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
