"""Training-step throughput on CPU: our H-JEPA (reduced to plain I-JEPA) vs lightly's I-JEPA.

One training step = forward (context encoder on the context patches, EMA target encoder on
the full image, predictor on context + target-block queries, smooth-L1 loss) + backward +
AdamW step + EMA update of the target encoder. No grad clipping, no autocast: the trained
modules run in fp32. Our target encoder's no-grad pass runs at the default
``training.target_precision=auto``: a pure bf16 pass where the CPU multiplies bf16 natively (AMX
or AVX512-BF16), else fp32; a second row of ours runs it in fp32 (``target_precision=fp32``), and
a second row of lightly runs its whole forward under bf16 autocast, lightly's one way to use bf16.

* ours: ``build_hjepa`` from ``load_config`` with ``data.use_multicrop=false`` (one global
  crop, no local crops), ``masking.num_hierarchies=1``, ``loss.hierarchy_weights=[1.0]`` and
  ``loss.image_weight=0`` (no image-level query),
  so the model is plain I-JEPA; AdamW from ``hjepa_core.train.optim`` and
  ``HJEPA.update_target``.
* lightly: ``IJEPABackbone`` (torchvision ViT, class token, learned position embedding) as
  context and target encoder, ``IJEPAPredictor`` with a torchvision ``Encoder`` stack of the
  same width / depth as ours, the forward of lightly's I-JEPA example (target encoder ->
  layer norm -> ``apply_masks`` -> ``repeat_interleave_batch``; context encoder with
  ``idx_keep``; predictor with ``masks_x`` / ``masks``), ``nn.SmoothL1Loss``, the same AdamW
  parameter groups and ``lightly.models.utils.update_momentum``.

Both get exactly the same masks each step: our ``HierarchicalMaskGenerator`` (via
``Config.build_mask_generator``) draws a context index tensor and 4 target blocks per image;
lightly gets the context as ``masks_enc`` and each target block as one entry of
``masks_pred``. Eager rows get each batch's blocks at their drawn size (what eager training
draws); compiled rows get them padded to the largest block the scales allow (static shapes, as
``training.compile`` draws them: the padding is hidden from our attention and loss, and is real
repeated target tokens for lightly). lightly's encoder sequence starts with a class token, so indices into encoder
tokens are shifted by one (the class token is dropped from the context, as in I-JEPA);
indices into the predictor's position table are not.

Timing: ``torch.set_num_threads`` (default 2), a few warm-up steps each, then N timed steps
interleaved ours/lightly (order alternating), median per library; phases (forward, backward,
optimizer, EMA) are timed too. Model FLOPs of forward + backward are counted for both
(``torch.utils.flop_counter``), so the speed ratio splits into less work and speed per FLOP.
``--compile`` adds both models under ``torch.compile`` with static shapes (ours through the
engine's ``compile_modules``, as ``training.compile=true`` trains; lightly's encoder, target
encoder and predictor the same way), built from the same seed and timed in the same interleave.

    python benchmarks/bench_train_step.py                 # writes benchmarks/results/train_step.{json,md}
    python benchmarks/bench_train_step.py --steps 2 --warmup 1 --out /tmp/bench   # quick check
    python benchmarks/bench_train_step.py --compile --steps 20   # eager and compiled, side by side
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from quality.lightly_ijepa import LightlyIJEPA  # benchmarks/quality/, shared with the quality benchmark

from hjepa_core.config import Config, load_config
from hjepa_core.data.multicrop_dataset import MultiCropBatch
from hjepa_core.masks import MultiCropMasks
from hjepa_core.models import build_hjepa
from hjepa_core.models.hjepa import HJEPA
from hjepa_core.models.layers import flop_counter
from hjepa_core.train.device import compile_modules
from hjepa_core.train.optim import build_optimizer, set_schedule

LR, WEIGHT_DECAY, EMA = 1e-4, 0.04, 0.996


def settings_from_args(args: argparse.Namespace) -> dict:
    return {
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "patch_size": 16,
        "encoder": {"embed_dim": 192, "depth": 6, "num_heads": 3, "mlp_ratio": 4.0},
        "predictor": {"embed_dim": 96, "depth": 4, "num_heads": 3, "mlp_ratio": 4.0},
        "masks": {
            "source": "ours (HierarchicalMaskGenerator), identical tensors fed to both; eager rows: each "
                      "batch's blocks at their drawn size; compiled rows: padded to the largest block "
                      "(static shapes)",
            "num_target_blocks": 4,
            "target_scale": [0.15, 0.2],
            "target_aspect_ratio": [0.75, 1.5],
            "context_scale": [0.85, 1.0],
            "context_excludes_targets": True,
        },
        "loss": "smooth_l1 (beta 1), targets = layer-normed target-encoder tokens",
        "optimizer": f"AdamW lr={LR} betas=(0.9, 0.95) wd={WEIGHT_DECAY} (no wd on 1-D / tokens), foreach default",
        "ema_momentum": EMA,
        "grad_clip": None,
        "precision": "fp32 (no autocast); ours' target pass at target_precision=auto, also a row with fp32",
        "threads": args.threads,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
    }


def ours_overrides(s: dict) -> list[str]:
    """Our config reduced to plain I-JEPA at the settings' sizes."""
    e, p, m = s["encoder"], s["predictor"], s["masks"]
    return [
        "data.use_multicrop=false",
        f"data.multicrop.global_crop_size={s['image_size']}",
        "masking.num_hierarchies=1",
        "loss.hierarchy_weights=[1.0]",
        "loss.type=smooth_l1",
        "loss.vicreg_weight=0.0",
        "loss.image_weight=0.0",  # plain I-JEPA: no image-level query, as lightly has none
        f"masking.num_target_masks={m['num_target_blocks']}",
        f"masking.base_scale={m['target_scale']}",
        f"masking.aspect_ratio_range={m['target_aspect_ratio']}",
        f"masking.context_scale={m['context_scale']}",
        "model.encoder=custom",
        f"model.patch_size={s['patch_size']}",
        f"model.embed_dim={e['embed_dim']}",
        f"model.depth={e['depth']}",
        f"model.num_heads={e['num_heads']}",
        f"model.mlp_ratio={e['mlp_ratio']}",
        f"model.predictor_embed_dim={p['embed_dim']}",
        f"model.predictor_depth={p['depth']}",
        f"model.predictor_num_heads={p['num_heads']}",
        "training.precision=fp32",
    ]


def build_ours(config: Config) -> tuple[HJEPA, torch.optim.Optimizer]:
    model = build_hjepa(config).train()
    optimizer = build_optimizer(model, LR)
    set_schedule(optimizer, LR, WEIGHT_DECAY)
    return model, optimizer


def median(values: list[float]) -> float:
    return statistics.median(values)


@dataclass
class Contender:
    """One model in the race: its loss for step ``i``'s batch, its optimizer and EMA update."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss_of: Callable[[int], torch.Tensor]
    ema: Callable[[], None]

    def step(self, i: int) -> dict[str, float]:
        t0 = time.perf_counter()
        loss = self.loss_of(i)
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        self.ema()
        t4 = time.perf_counter()
        return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2, "ema": t4 - t3, "total": t4 - t0}


def build_contenders(s: dict, config: Config, compiled: bool, images: list[torch.Tensor],
                     ours_batch: Callable[[int], MultiCropBatch],
                     lightly_masks: Callable[[int], tuple[list[torch.Tensor], list[torch.Tensor]]],
                     ) -> dict[str, Contender]:
    """Ours and lightly's model from the same seed; ``compiled``: ``torch.compile`` with static
    shapes, ours through the engine's ``compile_modules`` (``training.compile``), lightly's three
    modules the same way (the masks give it the same shapes every step too)."""
    from lightly.models.utils import update_momentum

    torch.manual_seed(0)
    ours, ours_opt = build_ours(config)
    torch.manual_seed(0)
    lightly_model = LightlyIJEPA(s).train()
    lightly_opt = build_optimizer(lightly_model, LR)
    set_schedule(lightly_opt, LR, WEIGHT_DECAY)
    if compiled:
        compile_modules(ours)
        for module in (lightly_model.encoder, lightly_model.target_encoder, lightly_model.predictor):
            module.compile(dynamic=False)
    suffix = " compiled" if compiled else ""
    return {
        f"ours{suffix}": Contender(ours, ours_opt, lambda i: ours(ours_batch(i)).loss,
                                   lambda: ours.update_target(EMA)),
        f"lightly{suffix}": Contender(
            lightly_model, lightly_opt, lambda i: lightly_model(images[i], *lightly_masks(i)),
            lambda: update_momentum(lightly_model.encoder, lightly_model.target_encoder, EMA)),
    }


def with_autocast(contender: Contender) -> Contender:
    """The contender with its forward under CPU bf16 autocast."""
    def loss_of(i: int) -> torch.Tensor:
        with torch.autocast("cpu", torch.bfloat16):
            return contender.loss_of(i)
    return Contender(contender.model, contender.optimizer, loss_of, contender.ema)


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    s = settings_from_args(args)
    config = load_config(None, ours_overrides(s))
    b, size = s["batch_size"], s["image_size"]
    total = args.warmup + args.steps
    images = [torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(i)) for i in range(total)]
    box = torch.tensor([0.0, 0.0, 1.0, 1.0]).expand(1, b, 4).contiguous()

    def feeds(config: Config) -> tuple[list[MultiCropMasks], Callable[[int], MultiCropBatch],
                                       Callable[[int], tuple[list[torch.Tensor], list[torch.Tensor]]]]:
        """The masks this config's generator draws (padded target blocks under ``training.compile``,
        the cells drawn are the same) as our batches and as lightly's mask lists."""
        gen = config.build_mask_generator(seed=0)
        mask_sets = [gen(b) for _ in range(total)]

        def ours_batch(i: int) -> MultiCropBatch:
            return MultiCropBatch(
                crops=[images[i]], labels=torch.zeros(b, dtype=torch.long), boxes=box,
                flips=torch.zeros(1, b, dtype=torch.bool), indices=torch.arange(b),
                num_global_crops=1, masks=mask_sets[i],
            )

        def lightly_masks(i: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
            gm = mask_sets[i].global_masks[0]
            return [gm.context], list(gm.targets[0].unbind(1))  # (B, M, T) -> M x (B, T)

        return mask_sets, ours_batch, lightly_masks

    mask_sets, ours_batch, lightly_masks = feeds(config)
    contenders = build_contenders(s, config, False, images, ours_batch, lightly_masks)
    # A second pair from the same seed: ours with an fp32 target pass, lightly under bf16 autocast.
    second = build_contenders(s, load_config(None, [*ours_overrides(s), "training.target_precision=fp32"]),
                              False, images, ours_batch, lightly_masks)
    contenders["ours fp32 targets"] = second["ours"]
    contenders["lightly bf16 autocast"] = with_autocast(second["lightly"])
    # Model FLOPs of forward + backward, counted over the warm-up steps' masks: how much of the
    # speed ratio is less work.
    flops = {}
    for name, c in contenders.items():
        with flop_counter() as counter:
            for i in range(args.warmup):
                c.loss_of(i).backward()
        c.optimizer.zero_grad(set_to_none=True)
        flops[name] = counter.get_total_flops() / max(args.warmup, 1)
    if args.compile:
        # Static shapes: both compiled models get the padded blocks, hidden from our attention and
        # loss, and real (repeated) target tokens for lightly, which has no validity mask.
        compiled = load_config(None, [*ours_overrides(s), "training.compile=true"])
        contenders |= build_contenders(s, compiled, True, images, *feeds(compiled)[1:])
    warmup_s = {name: [c.step(i)["total"] for i in range(args.warmup)] for name, c in contenders.items()}
    load_before = os.getloadavg()
    times: dict[str, list[dict[str, float]]] = {name: [] for name in contenders}
    for j in range(args.steps):
        i = args.warmup + j
        order = list(contenders) if j % 2 == 0 else list(reversed(contenders))
        for name in order:
            times[name].append(contenders[name].step(i))
    load_after = os.getloadavg()

    def pair_ratio(fast: str, slow: str) -> float:  # per interleaved pair: less sensitive to load drift
        return median([s_["total"] / f["total"] for f, s_ in zip(times[fast], times[slow], strict=True)])

    gm = mask_sets[0].global_masks[0]
    results = {}
    for name, c in contenders.items():
        phases = {k: median([t[k] for t in times[name]]) for k in times[name][0]}
        totals = [t["total"] for t in times[name]]
        results[name] = {
            "images_per_s": b / phases["total"],
            "step_s_median": phases["total"],
            "step_s_min": min(totals),
            "step_s_max": max(totals),
            "phase_s_median": phases,
            "first_step_s": warmup_s[name][0],  # includes compilation for the compiled rows
            "trainable_params": sum(p.numel() for p in c.model.parameters() if p.requires_grad),
            "gflops_per_step": flops[name.removesuffix(" compiled")] / 1e9,
            "steps_s": totals,
        }
    ratios = {"eager": pair_ratio("ours", "lightly"),
              "ours_fp32_targets": pair_ratio("ours fp32 targets", "lightly"),
              "lightly_bf16_autocast": pair_ratio("ours", "lightly bf16 autocast")}
    if args.compile:
        ratios |= {"compiled": pair_ratio("ours compiled", "lightly compiled"),
                   "ours_compiled_over_lightly_eager": pair_ratio("ours compiled", "lightly"),
                   "ours_compiled_over_ours_eager": pair_ratio("ours compiled", "ours")}
    return {
        "settings": s | {"compile": args.compile,
                         "ours_target_pass": str(contenders["ours"].model.target_dtype("cpu")).removeprefix("torch.")},
        "mask_example": {
            "grid": gm.grid_sizes[0],
            "context_tokens": int(gm.context.shape[1]),
            "target_tokens_per_block": int(gm.targets[0].shape[2]),
            "blocks": int(gm.targets[0].shape[1]),
        },
        "results": results,
        "ratio_ours_over_lightly": results["ours"]["images_per_s"] / results["lightly"]["images_per_s"],
        "ratio_median_of_pairs": ratios["eager"],
        "ratios_median_of_pairs": ratios,
        "ratio_best_steps": results["lightly"]["step_s_min"] / results["ours"]["step_s_min"],
        "flops_ratio_lightly_over_ours": flops["lightly"] / flops["ours"],
        "loadavg_before": list(load_before),
        "loadavg_after": list(load_after),
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "lightly": __import__("lightly").__version__,
        },
    }


def markdown(r: dict) -> str:
    s, res = r["settings"], r["results"]
    e, p, m = s["encoder"], s["predictor"], s["masks"]
    me = r["mask_example"]
    lines = [
        "# Training-step throughput (CPU): ours vs lightly I-JEPA",
        "",
        "One step = forward + backward + AdamW step + EMA update; median of "
        f"{s['timed_steps']} interleaved timed steps after {s['warmup_steps']} warm-up steps each, "
        f"`torch.set_num_threads({s['threads']})`, fp32 modules (no autocast unless named), no grad clipping; "
        f"our target encoder's pass: {s['ours_target_pass']} (`training.target_precision=auto` on this CPU).",
        "",
        "| model | images/s (median step) | images/s (best step) | step (s, median) | min / max (s) "
        "| forward | backward | AdamW | EMA | first step (s) | GFLOP fwd+bwd | trainable params |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    labels = {"ours": "ours (HJEPA, 1 level, single crop)", "lightly": "lightly I-JEPA modules",
              "ours fp32 targets": "ours, fp32 target pass", "lightly bf16 autocast": "lightly, bf16 autocast"}
    for name, x in res.items():
        ph = x["phase_s_median"]
        label = labels[name.removesuffix(" compiled")] + (", `torch.compile`" if name.endswith(" compiled") else "")
        lines.append(
            f"| {label} | {x['images_per_s']:.1f} | {s['batch_size'] / x['step_s_min']:.1f} | "
            f"{x['step_s_median']:.3f} | "
            f"{x['step_s_min']:.3f} / {x['step_s_max']:.3f} | {ph['forward']:.3f} | {ph['backward']:.3f} | "
            f"{ph['optimizer']:.3f} | {ph['ema']:.4f} | {x['first_step_s']:.1f} | {x['gflops_per_step']:.1f} | "
            f"{x['trainable_params']:,} |"
        )
    ratio_labels = {"eager": "ours / lightly, both eager", "compiled": "ours / lightly, both compiled",
                    "ours_fp32_targets": "ours with fp32 targets / lightly",
                    "lightly_bf16_autocast": "ours / lightly with bf16 autocast",
                    "ours_compiled_over_lightly_eager": "ours compiled / lightly eager",
                    "ours_compiled_over_ours_eager": "ours compiled / ours eager"}
    lines += [
        "",
        f"**ratio ours / lightly (images/s, median steps): {r['ratio_ours_over_lightly']:.2f}x**; "
        f"median of per-pair ratios: {r['ratio_median_of_pairs']:.2f}x; best steps: {r['ratio_best_steps']:.2f}x",
        "",
        "Median per-pair step-time ratios: " + "; ".join(
            f"{ratio_labels[k]} **{v:.2f}x**" for k, v in r.get("ratios_median_of_pairs", {}).items()),
        "",
        f"Model FLOPs per step (forward + backward, `torch.utils.flop_counter`): lightly does "
        f"{r['flops_ratio_lightly_over_ours']:.2f}x ours, so {r['flops_ratio_lightly_over_ours']:.2f}x of the "
        "speed ratio is less work and the rest is speed per FLOP.",
        "",
        "Phase columns are medians in seconds (forward, backward, AdamW step + zero_grad, EMA).",
        "",
        f"Load average (1/5/15 min) before timing: {', '.join(f'{v:.2f}' for v in r['loadavg_before'])}; "
        f"after: {', '.join(f'{v:.2f}' for v in r['loadavg_after'])} "
        f"({r['machine']['cpu_count']} cores, shared). Machine: {r['machine']['platform']}, "
        f"Python {r['machine']['python']}, torch {r['machine']['torch']}, lightly {r['machine']['lightly']}.",
        "",
        "## Settings",
        "",
        f"- batch {s['batch_size']}, images {s['image_size']} px (random normal), patch {s['patch_size']} "
        f"-> {me['grid']}x{me['grid']} = {me['grid'] ** 2} patches",
        f"- encoder: ViT embed {e['embed_dim']}, depth {e['depth']}, heads {e['num_heads']}, "
        f"MLP ratio {e['mlp_ratio']} (ours: no class token, fixed sin-cos positions; lightly: "
        "torchvision ViT with class token and learned positions)",
        f"- predictor: embed {p['embed_dim']}, depth {p['depth']}, heads {p['num_heads']}, "
        f"MLP ratio {p['mlp_ratio']} (lightly: `IJEPAPredictor` with a torchvision `Encoder` stack of that size)",
        f"- masks: {m['source']}; {m['num_target_blocks']} target blocks, scale {m['target_scale']}, "
        f"aspect {m['target_aspect_ratio']}, context block scale {m['context_scale']} minus targets; "
        f"first batch: {me['context_tokens']} context tokens, {me['blocks']} x {me['target_tokens_per_block']} "
        "target tokens per image",
        "- ours: `load_config` with `data.use_multicrop=false`, `masking.num_hierarchies=1`, "
        "`loss.hierarchy_weights=[1.0]`, `loss.image_weight=0`, `model.encoder=custom`; `build_hjepa`; "
        "predictor runs the context plus all target blocks' queries in one sequence per image",
        "- lightly: forward of lightly's I-JEPA example; the predictor repeats the context once per "
        "target block (batch x blocks sequences of context + one block)",
        f"- loss: {s['loss']}; optimizer: {s['optimizer']}; EMA momentum {s['ema_momentum']} "
        "(ours `torch._foreach_lerp_`, lightly `update_momentum`)",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--compile", action="store_true",
                        help="also time both models under torch.compile (static shapes; inductor needs a C++ compiler)")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    r = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train_step.json").write_text(json.dumps(r, indent=2) + "\n")
    text = markdown(r)
    (out / "train_step.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
