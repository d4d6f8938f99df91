"""The H-JEPA training engine behind ``hjepa train``, the DVC stage and the KFP component.

One loop for CPU, one GPU and torchrun DDP: keyed data randomness (exact mid-epoch resume),
bf16 autocast on CUDA (fp16 + GradScaler on request), gradient accumulation and clipping,
per-step LR / weight-decay / EMA schedules, atomic checkpoints (also on SIGTERM), MLflow
logging from rank 0, and the outputs a later stage needs (encoder weights + config).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import signal
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from hjepa_core.config import Config, ConfigError
from hjepa_core.data.multicrop_dataset import (
    MultiCropBatch,
    SeededBatchSampler,
    auto_num_workers,
    build_multicrop_dataloader,
    build_multicrop_dataset,
)
from hjepa_core.data.shards import ShardMultiCropDataset
from hjepa_core.data.shards.integrity import describe
from hjepa_core.losses import collapse_statistics
from hjepa_core.models.hjepa import HJEPA, HJEPAOutput, build_hjepa
from hjepa_core.models.vit import VisionTransformer
from hjepa_core.plots import plot_curves
from hjepa_core.tracking import check_tracking_uri, resolve_tracking_uri, start_tracker
from hjepa_core.train.checkpoint import CheckpointError, load_resume, remove_stale_temps, save_checkpoint
from hjepa_core.train.device import MetricWindow, compile_modules
from hjepa_core.train.distributed import DistInfo, init_distributed, shutdown_distributed
from hjepa_core.train.optim import build_optimizer, set_schedule
from hjepa_core.train.schedules import cosine_schedule, ema_momentum
from hjepa_core.utils import atomic_torch_save, atomic_write_text, make_dirs, mix_seeds, rank_world, run_lock

ENCODER_FILE = "encoder.pt"
METRICS_FILE = "metrics.json"
SUMMARY_FILE = "summary.json"  # flat: steps, epochs_completed, final_loss (DVC metrics)
LOSS_HISTORY_FILE = "loss_history.csv"  # step,loss (DVC plots)
_MODEL_SALT = 0x5EED_D407  # keeps the model's per-step RNG stream apart from the data's keyed seeds


EpochMonitor = Callable[[VisionTransformer, torch.device], dict[str, float]]
"""An evaluation hook: metrics of the target encoder, run every ``data.knn_monitor_every`` epochs
and at the end, on every rank at the same step (a monitor shares its work across ranks; rank 0
logs). :class:`hjepa_core.eval.knn_monitor.EpochKnnMonitor` is the usual one."""


@dataclass
class TrainResult:
    """What a finished (or pre-empted) run leaves behind."""

    output_dir: Path
    encoder_path: Path | None
    metrics: dict[str, Any]
    run_id: str | None
    steps: int
    preempted: bool = False


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"training.device={name} but CUDA is not available; use training.device=cpu")
    return torch.device(name)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """bf16 on CUDA for ``auto``; fp32 (no autocast) on CPU unless asked."""
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def save_encoder(model: HJEPA, config: Config, path: Path, run_id: str | None = None) -> Path:
    """The target (EMA) encoder's weights with its architecture, the context encoder's weights (an
    evaluation scores both and reports the better), the run's config and its MLflow run id (so an
    evaluation can link itself to exactly this run)."""
    encoder = model.target_encoder
    state = {"arch": encoder.arch(), "state_dict": encoder.state_dict(),
             "context_state_dict": model.encoder.state_dict(), "config": config.to_dict(),
             "mlflow_run_id": run_id or ""}
    return atomic_torch_save(state, path)


def check_fills_a_step(dataset: torch.utils.data.Dataset, config: Config, world_size: int) -> None:
    """Raises :class:`ConfigError` when the training data cannot fill one optimizer step on every
    rank (``training.batch_size`` x ``training.accumulation_steps`` samples), before any training."""
    try:
        size = len(dataset)  # type: ignore[arg-type]
    except TypeError:  # a stream of unknown length
        return
    per_rank = size if isinstance(dataset, torch.utils.data.IterableDataset) else size // world_size
    t, d = config.training, config.data
    needed = t.batch_size * t.accumulation_steps
    if per_rank < needed:
        where = f"data.dataset={d.dataset}" + (f", data.max_samples={d.max_samples}" if d.max_samples else "")
        raise ConfigError(f"the training data ({where}) has {per_rank} samples per rank, fewer than one step "
                          f"needs (training.batch_size={t.batch_size} x training.accumulation_steps="
                          f"{t.accumulation_steps}); lower training.batch_size or use more data")


class _PreemptionFlag:
    """Turns SIGTERM (Kubernetes pre-emption) into a flag the loop checks after each step."""

    def __init__(self) -> None:
        self.raised = False
        self._previous: Any = None

    def __enter__(self) -> _PreemptionFlag:
        with contextlib.suppress(ValueError):  # signals only install in the main thread
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.raised = True

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class Trainer:
    """Holds the state of one training run; :func:`train` is the entry point."""

    def __init__(self, config: Config, resume: str | None = None, progress: bool = True,
                 monitor: EpochMonitor | None = None) -> None:
        self.config = config
        self.monitor = monitor
        if config.data.knn_monitor_every and monitor is None:
            warnings.warn("data.knn_monitor_every is set but no monitor was passed to train(); "
                          "pass monitor=EpochKnnMonitor(config) (hjepa_core.eval)", stacklevel=2)
        t = config.training
        self.device = resolve_device(t.device)
        self.dist: DistInfo = init_distributed(self.device.type)
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        self.output_dir = Path(t.output_dir)
        self.progress = progress and self.dist.is_main
        if self.dist.is_main and config.tracking.enabled:  # an unreachable server fails before any work
            check_tracking_uri(resolve_tracking_uri(config.tracking.tracking_uri))
        torch.manual_seed(t.seed)

        self.dataset = build_multicrop_dataset(
            dataset_name=config.data.dataset,
            data_path=config.data.data_path,
            split="train",
            max_samples=config.data.max_samples,
            seed=t.seed,
            **dataclasses.asdict(config.crops),
        )
        check_fills_a_step(self.dataset, config, self.dist.world_size)
        self.loader = build_multicrop_dataloader(
            self.dataset,
            batch_size=t.batch_size,
            num_workers=(config.data.num_workers if config.data.num_workers is not None
                         else auto_num_workers(self.device.type)),
            seed=t.seed,
            mask_generator=config.build_mask_generator(),
            defer_photometric=self.device.type == "cuda",
            pin_memory=config.data.pin_memory and self.device.type == "cuda",
            persistent_workers=True,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
        )
        self.integrity = getattr(self.dataset, "integrity", None)  # shards: corrupt shards and lost samples
        self.batches_per_epoch = len(self.loader)
        self.steps_per_epoch = self.batches_per_epoch // t.accumulation_steps
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"one epoch has {self.batches_per_epoch} batches, fewer than training.accumulation_steps="
                f"{t.accumulation_steps}; lower accumulation_steps or batch_size"
            )
        # With a time budget the run ends on the clock, not the epoch count; schedules keep the
        # epoch schedule's shape (warmup fraction warmup_epochs / epochs) over elapsed time, so
        # variants compared at equal wall-clock all finish their cosine.
        self.time_budget = t.time_budget_s
        self.total_steps = t.epochs * self.steps_per_epoch if self.time_budget is None else 2**62
        if t.max_steps is not None:
            self.total_steps = min(self.total_steps, t.max_steps)
        self.warmup_fraction = min(t.warmup_epochs / t.epochs, 1.0)
        self.train_seconds = 0.0
        self.images_seen = 0
        # The MLflow run starts once the data is known to fill a step; a failure from here ends it FAILED.
        self.tracker = start_tracker(config.tracking, enabled=self.dist.is_main)
        try:
            self._build(resume)
        except BaseException:
            self.tracker.finish("FAILED")
            raise

    def _build(self, resume: str | None) -> None:
        """The model, optimizer and scaler (restored from ``resume`` when given), DDP-wrapped."""
        config, t = self.config, self.config.training
        self.model = build_hjepa(config).to(self.device)
        self.optimizer = build_optimizer(self.model, t.lr)
        self.amp_dtype = autocast_dtype(t.precision, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.step = 0
        self.epoch = 0
        self.next_batch = 0
        self.history: list[dict[str, float]] = []
        self.window = MetricWindow(self.device)
        self._host_group: Any = None
        self._monitor_step = -1
        if self.dist.is_main:
            remove_stale_temps(self.output_dir / "checkpoints")
        found = load_resume(resume, self.output_dir) if resume else None
        if found is not None:
            self._load(*found)
        if t.compile:
            compile_modules(self.model, t.compile_backend)
        self.ddp = (
            DistributedDataParallel(self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            if self.dist.enabled else None
        )

    # -- state -----------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "epoch": self.epoch,
            "next_batch": self.next_batch,
            "history": self.history,
            "train_seconds": self.train_seconds,
            "images_seen": self.images_seen,
            "rng_cpu": torch.get_rng_state(),
            "config": self.config.to_dict(),
        }
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _load(self, path: Path, state: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError) as exc:
            detail = " ".join(str(exc).split()).removeprefix("Error(s) in loading state_dict for HJEPA: ")
            raise CheckpointError(f"{path} was written for another model ({detail[:160]}...); resume with the "
                                  "config it was trained with (config.yaml beside it)") from exc
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.next_batch = state["step"], state["epoch"], state["next_batch"]
        self.history = list(state.get("history", []))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.images_seen = int(state.get("images_seen", 0))
        torch.set_rng_state(state["rng_cpu"])
        if "rng_cuda" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)

    def save_checkpoint(self) -> Path | None:
        if not self.dist.is_main:
            return None
        return save_checkpoint(self._state(), self.output_dir / "checkpoints", self.step,
                               self.config.training.keep_last_checkpoints)

    # -- loop ------------------------------------------------------------------------------
    def _progress(self) -> float:
        """Fraction of the run done: elapsed / budget with a time budget, else step / total steps."""
        if self.time_budget is not None:
            return min(self.train_seconds / self.time_budget, 1.0)
        return min(self.step / max(self.total_steps, 1), 1.0)

    def _out_of_time(self) -> bool:
        return self.time_budget is not None and self.train_seconds >= self.time_budget

    def _agreed_seconds(self, seconds: float) -> float:
        """The slowest rank's step time under DDP with a time budget, so that every rank follows
        the same schedule and stops at the same step: one tiny all-reduce per step of a host
        tensor (over gloo), which does not wait for the GPU."""
        if self.time_budget is None or not self.dist.enabled:
            return seconds
        if self._host_group is None:
            self._host_group = dist.group.WORLD if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
        value = torch.tensor([seconds], dtype=torch.float64)
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=self._host_group)
        return value.item()

    def _schedules(self) -> dict[str, float]:
        t, progress = self.config.training, self._progress()
        return {
            "lr": cosine_schedule(progress, 1.0, t.lr, t.min_lr, self.warmup_fraction),
            "weight_decay": cosine_schedule(progress, 1.0, t.weight_decay, t.weight_decay_end),
            "ema_momentum": ema_momentum(progress, 1.0, t.ema_momentum, t.ema_momentum_end),
        }

    def _prepare(self, batch: MultiCropBatch) -> MultiCropBatch:
        batch = batch.to(self.device)
        if not batch.normalized:
            generator = torch.Generator().manual_seed(batch.seed) if batch.seed is not None else None
            batch.crops = self.dataset.transform.photometric(batch.crops, batch.num_global_crops, generator)
            batch.normalized = True
        return batch

    def _micro_step(self, batch: MultiCropBatch, last_micro: bool) -> HJEPAOutput:
        """Forward and backward of one micro-batch; its loss parts join the window on the device."""
        t = self.config.training
        sync = contextlib.nullcontext() if (last_micro or self.ddp is None) else self.ddp.no_sync()
        with sync:
            with torch.autocast(self.device.type, dtype=self.amp_dtype or torch.float32,
                                enabled=self.amp_dtype is not None):
                out = (self.ddp or self.model)(batch)
            self.scaler.scale(out.loss / t.accumulation_steps).backward()
        self.window.add({"loss": out.loss.detach(), **out.parts}, 1.0 / t.accumulation_steps)
        return out

    def _optimizer_step(self, schedule: dict[str, float]) -> None:
        """Clip, AdamW step and EMA update, the same on every rank; the grad norm stays on the device."""
        set_schedule(self.optimizer, schedule["lr"], schedule["weight_decay"])
        self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                   self.config.training.grad_clip or float("inf"))
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.update_target(schedule["ema_momentum"])
        self.window.add({"grad_norm": grad_norm}, 1.0)
        self.window.steps += 1

    def _flush_window(self, schedule: dict[str, float]) -> dict[str, float]:
        """Reads the window's sums (the one host-device sync of a log window), logs their means
        and the window's throughput, and starts a new window."""
        window, self.window = self.window, MetricWindow(self.device)
        means, pending = window.read(self.dist.world_size)
        for step, values in pending:
            self._log(values, step=step)
        if not means:
            return {}
        metrics = {**means, **schedule}
        elapsed = time.perf_counter() - window.start
        metrics["images_per_s"] = window.images * self.dist.world_size / max(elapsed, 1e-9)
        metrics["epoch"] = self.epoch
        if self.device.type == "cuda":
            metrics["gpu_memory_gb"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        self._log(metrics)
        return metrics

    def run(self) -> TrainResult:
        t, cfg = self.config.training, self.config
        if self.dist.is_main:
            make_dirs(self.output_dir)
            cfg.save(self.output_dir / "config.yaml")
            self.tracker.log_params(cfg.flat())
            self.tracker.log_artifact(self.output_dir / "config.yaml")
        self.model.train()
        self.window = MetricWindow(self.device)
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not self.progress, desc="train",
                   dynamic_ncols=True)
        preempted = False
        first_batch: MultiCropBatch | None = None
        clock = time.perf_counter()
        with _PreemptionFlag() as flag:
            while self.step < self.total_steps and not preempted and not self._out_of_time():
                if isinstance(self.dataset, ShardMultiCropDataset):
                    self.dataset.set_epoch(self.epoch)
                    self.dataset.skip_batches(self.next_batch, t.batch_size)
                else:
                    sampler = self.loader.batch_sampler
                    assert isinstance(sampler, SeededBatchSampler)  # build_multicrop_dataloader's, for map-style data
                    sampler.set_epoch(self.epoch)
                    sampler.skip_batches(self.next_batch)
                if hasattr(self.dataset.transform, "set_epoch"):
                    self.dataset.transform.set_epoch(self.epoch)
                micro, exhausted = 0, False
                self.optimizer.zero_grad(set_to_none=True)
                for batch_index, cpu_batch in enumerate(self.loader, start=self.next_batch):
                    if first_batch is None and self.dist.is_main:
                        first_batch = cpu_batch
                    micro += 1
                    batch = self._prepare(cpu_batch)
                    # The model's own randomness (drop-path) is keyed by (seed, step, micro-batch, rank),
                    # so a resumed run draws what the uninterrupted one drew, whatever else used the RNG.
                    torch.manual_seed(mix_seeds(t.seed, self.step, micro, self.dist.rank, salt=_MODEL_SALT))
                    out = self._micro_step(batch, last_micro=micro == t.accumulation_steps)
                    self.window.images += batch.batch_size
                    self.images_seen += batch.batch_size * self.dist.world_size
                    if micro < t.accumulation_steps:
                        continue
                    micro = 0
                    schedule = self._schedules()
                    self._optimizer_step(schedule)
                    self.step += 1
                    self.next_batch = batch_index + 1
                    now = time.perf_counter()
                    self.train_seconds += self._agreed_seconds(now - clock)
                    clock = now
                    finished = self.step >= self.total_steps or self._out_of_time()
                    bar.update(1)
                    if self.step % cfg.loss.collapse_every == 0 or self.step == 1:
                        self.window.pending.append((self.step, collapse_statistics(out.pooled_targets.detach())))
                    if self.step % t.log_every == 0 or finished or flag.raised:
                        metrics = self._flush_window(schedule)
                        self._check_data()
                        if metrics:
                            bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['images_per_s']:.0f}")
                    if t.checkpoint_every_steps and self.step % t.checkpoint_every_steps == 0:
                        self.save_checkpoint()
                    if flag.raised or finished:
                        preempted = flag.raised
                        break
                else:
                    exhausted = True
                if exhausted or self.next_batch >= self.batches_per_epoch:
                    self.epoch, self.next_batch = self.epoch + 1, 0
                    self._run_monitor()
                    clock = time.perf_counter()  # monitoring is not training time
        bar.close()
        if self.integrity is not None:
            self.integrity.merge_ranks()
            self._check_data()
        if not preempted:
            self._run_monitor(final=True)
        checkpoint = self.save_checkpoint()
        return self._finish(first_batch, preempted, checkpoint)

    def _run_monitor(self, final: bool = False) -> None:
        """The epoch monitor every ``data.knn_monitor_every`` epochs and at the end, on every rank
        (all reach it at the same step), so no rank idles at a collective while another evaluates."""
        every = self.config.data.knn_monitor_every
        due = final or self.epoch % every == 0 if every else False
        if not due or self.monitor is None or self._monitor_step == self.step:
            return
        self._monitor_step = self.step
        self._log(self.monitor(self.model.target_encoder, self.device))

    def _check_data(self) -> None:
        """Applies ``data.on_corrupt`` and ``data.max_corrupt_fraction`` to the shards read so far
        (raising :class:`ShardIntegrityError`), and logs the loss once there is one."""
        if self.integrity is None:
            return
        d = self.config.data
        summary = self.integrity.check(d.on_corrupt, d.max_corrupt_fraction, "training data")
        if summary["corrupt_shards"]:
            self._log({"data/corrupt_shards": len(summary["corrupt_shards"]),
                       "data/lost_samples": summary["lost_samples"], "data/lost_fraction": summary["fraction"]})

    def _log(self, metrics: dict[str, float], step: int | None = None) -> None:
        if not self.dist.is_main:
            return
        step = self.step if step is None else step
        self.history.append({"step": step, **metrics})
        self.tracker.log_metrics(metrics, step=step)

    def _finish(self, first_batch: MultiCropBatch | None, preempted: bool, checkpoint: Path | None) -> TrainResult:
        if not self.dist.is_main:
            return TrainResult(self.output_dir, None, {}, None, self.step, preempted)
        losses = [h for h in self.history if "loss" in h]
        summary: dict[str, Any] = {
            "steps": self.step,
            "epochs_completed": self.epoch,
            "images_seen": self.images_seen,
            "train_seconds": self.train_seconds,
            "final_loss": losses[-1]["loss"] if losses else None,
            "preempted": preempted,
            "history": self.history,
        }
        if self.integrity is not None:
            summary["data_integrity"] = self.integrity.summary()
            if summary["data_integrity"]["corrupt_shards"]:
                warnings.warn(f"training data: {describe(summary['data_integrity'])}; skipped (data.on_corrupt="
                              f"{self.config.data.on_corrupt}, data.max_corrupt_fraction="
                              f"{self.config.data.max_corrupt_fraction})", stacklevel=2)
        atomic_write_text(self.output_dir / METRICS_FILE, json.dumps(summary, indent=2))
        flat = {k: summary[k] for k in ("steps", "epochs_completed", "final_loss")}
        atomic_write_text(self.output_dir / SUMMARY_FILE, json.dumps(flat, indent=2))
        atomic_write_text(self.output_dir / LOSS_HISTORY_FILE,
                          "step,loss\n" + "".join(f"{h['step']},{h['loss']}\n" for h in losses))
        if preempted:
            self.tracker.finish("KILLED")
            return TrainResult(self.output_dir, None, summary, self.tracker.run_id, self.step, True)
        encoder_path = save_encoder(self.model, self.config, self.output_dir / ENCODER_FILE, self.tracker.run_id)
        curves = {
            name: [(h["step"], h[name]) for h in losses if name in h]
            for name in sorted({k for h in losses for k in h if k.startswith("loss")})
        }
        plot_curves(curves, self.output_dir / "loss_curve.png", title="H-JEPA training loss", ylabel="loss")
        artifacts = [self.output_dir / METRICS_FILE, self.output_dir / "loss_curve.png", encoder_path]
        if first_batch is not None and first_batch.masks is not None:
            from hjepa_core.masks.visualize import render_multicrop_masks

            artifacts.append(render_multicrop_masks(first_batch, self.output_dir / "crops_and_masks.png"))
        for path in artifacts:
            self.tracker.log_artifact(path)
        if checkpoint is not None:  # the final training state (model, EMA, optimizer): resumable from MLflow
            self.tracker.log_artifact(checkpoint, "checkpoints")
        self.tracker.log_metrics({"final_loss": summary["final_loss"] or float("nan")}, step=self.step)
        self.tracker.finish("FINISHED")
        return TrainResult(self.output_dir, encoder_path, summary, self.tracker.run_id, self.step)


def train(config: Config, resume: str | None = None, progress: bool = True,
          monitor: EpochMonitor | None = None) -> TrainResult:
    """Trains H-JEPA as ``config`` says; resumes from ``resume`` (a path or ``auto``); runs
    ``monitor`` on the target encoder as ``data.knn_monitor_every`` says. The main process holds
    the output directory's run lock throughout (a second run there fails at once)."""
    config.check_environment()
    main_process = rank_world()[0] == 0
    with run_lock(config.training.output_dir) if main_process else contextlib.nullcontext():
        trainer = Trainer(config, resume=resume, progress=progress, monitor=monitor)
        try:
            return trainer.run()
        except BaseException as exc:
            trainer.tracker.finish("KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            raise
        finally:
            shutdown_distributed()
