"""``hjepa evaluate``: frozen-feature evaluation of a pretrained encoder, with baselines, as one report.

For the encoder and, under the same protocol, two baselines (the same architecture with random
weights, and raw pixels), features of the train and test splits are extracted once (cached),
then a linear probe (:mod:`hjepa_core.eval.probe`) and weighted kNN (:mod:`hjepa_core.eval.knn`)
are scored on the test split. Writes ``eval.json``, ``confusion_matrix.png`` and ``report.md``
to the output directory and, when tracking is on, logs them to an MLflow run in the pretraining
run's experiment, nested under the pretraining run (``mlflow.parentRunId``) and tagged with it.
"""

from __future__ import annotations

import functools
import json
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from hjepa_core.config import Config
from hjepa_core.data.shards.integrity import ON_CORRUPT, ShardIntegrity, describe
from hjepa_core.eval.features import (
    EvalError,
    FeatureCache,
    LoadedEncoder,
    check_pooling,
    data_fingerprint,
    extract_features,
    load_encoder,
    open_source,
    source_classes,
)
from hjepa_core.eval.knn import DEFAULT_K, DEFAULT_TEMPERATURE, knn_evaluate
from hjepa_core.eval.probe import ProbeSettings, linear_probe
from hjepa_core.models.vit import VisionTransformer
from hjepa_core.utils import atomic_write_text, redact_url

EVAL_FILE = "eval.json"
EVAL_METRICS_FILE = "metrics.json"  # flat report["metrics"] (DVC metrics)
CONFUSION_FILE = "confusion_matrix.png"
REPORT_FILE = "report.md"
METHODS = ("encoder", "random_init", "pixels")
_PREFIX = {"encoder": "", "target_encoder": "target_", "context_encoder": "context_",
           "random_init": "random_init_", "pixels": "pixels_"}


@dataclass
class EvalSettings:
    """What :func:`evaluate` does; every field has a CLI flag of the same name.

    Attributes:
        dataset, data_path: the evaluation data (a name ``build_source`` knows, ``shards:DIR``...);
            None uses the checkpoint config's ``data.dataset`` / ``data.data_path``.
        pooling: feature pooling (see :mod:`hjepa_core.eval.features`).
        max_train_samples, max_test_samples: fixed subsets (None: whole splits).
        baselines: also score random-init weights and raw pixels.
        tracking: log to MLflow; None follows the checkpoint config's ``tracking.enabled``.
        tracking_uri, experiment: None: the checkpoint config's (URI also from MLFLOW_TRACKING_URI).
        parent_run_id: the pretraining run; None takes the run id stored in ``encoder.pt``, else looks it
            up by ``training.output_dir`` in the experiment.
        registered_model_name: with tracking on, register the scored encoder under this name
            (:mod:`hjepa_core.eval.registry`); None: the checkpoint config's
            ``tracking.registered_model_name``; "": register nothing.
        cache_dir: feature cache (None: ``$HJEPA_CACHE/features``); ``use_cache=False`` disables it.
        output_dir: where the report goes (None: ``<checkpoint dir>/eval``).
        on_corrupt, max_corrupt_fraction: what corrupt shards do (skip them, counted and reported,
            or fail; and the loss above which a skip fails); None: the checkpoint config's ``data.*``.
    """

    dataset: str | None = None
    data_path: str | None = None
    pooling: str = "mean"
    max_train_samples: int | None = None
    max_test_samples: int | None = None
    batch_size: int = 256
    num_workers: int = 0
    k: int = DEFAULT_K
    temperature: float = DEFAULT_TEMPERATURE
    probe: ProbeSettings = field(default_factory=ProbeSettings)
    baselines: bool = True
    random_init_seed: int = 0
    pixel_size: int = 32
    device: str = "auto"
    cache_dir: str | None = None
    use_cache: bool = True
    output_dir: str | None = None
    progress: bool = True
    tracking: bool | None = None
    tracking_uri: str | None = None
    experiment: str | None = None
    parent_run_id: str | None = None
    registered_model_name: str | None = None
    on_corrupt: str | None = None
    max_corrupt_fraction: float | None = None


def _random_init_encoder(loaded: LoadedEncoder, seed: int) -> VisionTransformer:
    """The checkpoint's architecture with fresh weights (the model's own initialisation)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = VisionTransformer(**loaded.encoder.arch())
    return encoder.requires_grad_(False).eval()


def _drop_repeated_channels(train: Tensor, test: Tensor) -> tuple[Tensor, Tensor]:
    """Greyscale images arrive as 3 equal channels; keep one so raw pixels are not tripled."""
    def grey(x: Tensor) -> bool:
        c = x.view(len(x), 3, -1)
        return bool((c[:, 0] == c[:, 1]).all() and (c[:, 1] == c[:, 2]).all())

    if train.shape[1] % 3 == 0 and grey(train) and grey(test):
        side = train.shape[1] // 3
        return train[:, :side], test[:, :side]
    return train, test


def _plot_confusion(confusion: list[list[int]], classes: list[str], path: Path, title: str) -> Path:
    import matplotlib.pyplot as plt

    from hjepa_core.plots import save_figure_png

    counts = torch.tensor(confusion, dtype=torch.float64)
    rates = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    n = len(classes)
    size = max(5.0, 0.55 * n + 2.5)
    fig, ax = plt.subplots(figsize=(size, size * 0.9), dpi=110)
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), classes, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(n), classes, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=7,
                        color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    fig.tight_layout()
    return save_figure_png(fig, path)


def flat_metrics(methods: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``probe_top1``, ``knn_top5``, ``random_init_probe_top1``, ``pixels_knn_top1``, ... and
    ``probe_class_acc/<i>`` (the encoder probe's per-class accuracy)."""
    out: dict[str, float] = {}
    for name, result in methods.items():
        for protocol in ("probe", "knn"):
            for metric in ("top1", "top5"):
                if metric in result[protocol]:
                    out[f"{_PREFIX[name]}{protocol}_{metric}"] = result[protocol][metric]
    encoder_probe = methods.get("encoder", {}).get("probe", {})
    for i, acc in enumerate(encoder_probe.get("per_class", [])):
        if acc == acc:  # skip classes absent from the test split (nan)
            out[f"probe_class_acc/{i}"] = acc
    return out


def _select_encoder(methods: dict[str, dict[str, Any]]) -> tuple[dict[str, dict[str, Any]], str]:
    """Scores the better of the target (EMA) and context encoders as ``encoder`` (probe top-1, then
    kNN top-1) and keeps both as ``target_encoder`` / ``context_encoder``. Which one is better
    depends on the budget: a short run's EMA encoder still lags the online one."""
    if "context_encoder" not in methods:
        return methods, "target"
    target, context = methods.pop("encoder"), methods.pop("context_encoder")

    def score(result: dict[str, Any]) -> tuple[float, float]:
        return result["probe"]["top1"], result["knn"]["top1"]

    selected = "context" if score(context) > score(target) else "target"
    best = context if selected == "context" else target
    return {"encoder": best, "target_encoder": target, "context_encoder": context, **methods}, selected


def _markdown(report: dict[str, Any]) -> str:
    lines = [
        f"# Evaluation of `{report['checkpoint']}`",
        "",
        f"- dataset: `{report['dataset']}` (train {report['num_train']}, test {report['num_test']}, "
        f"{report['num_classes']} classes); crop {report['crop_size']} px; pooling `{report['pooling']}`",
        f"- linear probe: standardised features, SGD + cosine, {report['settings']['probe']['epochs']} epochs, "
        "lr x weight decay chosen on a held-out part of train, refit on all of train",
        f"- kNN: k={report['settings']['k']}, cosine, temperature {report['settings']['temperature']}",
        f"- `encoder` is the better of the checkpoint's encoders: the **{report['selected_encoder']}** encoder",
        *(f"- **{split} data: {describe(loss)}; skipped**" for split, loss in report["data_integrity"].items()
          if loss["corrupt_shards"]),
        "",
        "| method | probe top-1 | probe top-5 | kNN top-1 | kNN top-5 | feature dim |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]

    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.2f}"

    for name, result in report["methods"].items():
        probe, knn = result["probe"], result["knn"]
        lines.append(f"| {name} | {pct(probe['top1'])} | {pct(probe.get('top5'))} | {pct(knn['top1'])} | "
                     f"{pct(knn.get('top5'))} | {result['feature_dim']} |")
    encoder = report["methods"].get("encoder")
    if encoder:
        lines += ["", "Per-class accuracy of the encoder's linear probe:", "",
                  "| class | accuracy |", "| --- | ---: |"]
        lines += [f"| {c} | {pct(a) if a == a else '-'} |"
                  for c, a in zip(report["classes"], encoder["probe"]["per_class"], strict=False)]
    return "\n".join(lines) + "\n"


def _intact(integrity: ShardIntegrity | None) -> bool:
    return integrity is None or not integrity.summary()["corrupt_shards"]


def _check_data(integrity: ShardIntegrity | None, settings: EvalSettings, loaded: LoadedEncoder, split: str) -> None:
    """Applies the corrupt-data policy (settings, else the checkpoint config's) to a split's
    shards as read so far; a loss it allows is warned in one line."""
    if integrity is None or _intact(integrity):
        return
    data = loaded.config.data
    on_corrupt = settings.on_corrupt or data.on_corrupt
    limit = data.max_corrupt_fraction if settings.max_corrupt_fraction is None else settings.max_corrupt_fraction
    if on_corrupt not in ON_CORRUPT or not 0.0 <= limit <= 1.0:
        raise EvalError(f"on_corrupt={on_corrupt!r} must be one of {', '.join(ON_CORRUPT)} and "
                        f"max_corrupt_fraction={limit} in [0, 1]")
    summary = integrity.check(on_corrupt, limit, f"{split} data")
    warnings.warn(f"{split} data: {describe(summary)}; evaluated without them (on_corrupt={on_corrupt}, "
                  f"max_corrupt_fraction={limit})", stacklevel=3)


def _resolve_dataset(settings: EvalSettings, config: Config) -> tuple[str, str | None]:
    if settings.dataset is None:
        return config.data.dataset, settings.data_path or config.data.data_path
    return settings.dataset, settings.data_path


def _find_pretrain_run(experiment: str, output_dir: str, tracking_uri: str | None) -> str | None:
    """The newest non-evaluation run of ``experiment`` whose ``training.output_dir`` param is ``output_dir``."""
    from hjepa_core.tracking import ExperimentNotFoundError, search_runs

    escaped = output_dir.replace("'", "\\'")
    try:
        runs = search_runs(experiment, tracking_uri, filter_string=f"params.`training.output_dir` = '{escaped}'")
    except ExperimentNotFoundError:
        return None
    runs = [r for r in runs if r.tags.get("hjepa.stage") != "evaluate"]
    return runs[0].run_id if runs else None


def _start_tracking(settings: EvalSettings, loaded: LoadedEncoder, dataset: str) -> tuple[Any, str | None]:
    """An MLflow run for the evaluation (or None when tracking is off) and its parent run id."""
    from hjepa_core.tracking import BestEffortTracker, MlflowTracker

    cfg = loaded.config.tracking
    if not (settings.tracking if settings.tracking is not None else cfg.enabled):
        return None, None
    uri = settings.tracking_uri or cfg.tracking_uri
    experiment = settings.experiment or cfg.experiment
    parent = settings.parent_run_id or loaded.mlflow_run_id
    match = "given" if settings.parent_run_id else "checkpoint"
    if parent is None:
        parent = _find_pretrain_run(experiment, loaded.config.training.output_dir, uri)
        match = "training.output_dir" if parent else "none"
        if parent is None:
            warnings.warn(f"no pretraining run found in MLflow experiment {experiment!r} for "
                          f"training.output_dir={loaded.config.training.output_dir!r}; the evaluation run "
                          "is logged unlinked (pass --parent_run_id to link it)", stacklevel=3)
    tags = {"hjepa.stage": "evaluate", "hjepa.checkpoint": str(loaded.path),
            "hjepa.checkpoint_sha256": loaded.sha256, "hjepa.dataset": dataset, "hjepa.parent_match": match}
    if parent:
        tags["hjepa.pretrain_run_id"] = parent
    run_name = f"eval-{Path(loaded.config.training.output_dir).name or loaded.path.stem}"
    tracker = MlflowTracker(experiment, run_name=run_name, tracking_uri=uri, parent_run_id=parent, tags=tags)
    return BestEffortTracker(tracker, uri, timeout=cfg.timeout_s), parent


def evaluate(
    checkpoint: str | Path, settings: EvalSettings | None = None, config: Config | None = None
) -> dict[str, Any]:
    """Evaluates a frozen encoder checkpoint (and the baselines) by linear probe and kNN.

    Args:
        checkpoint: ``encoder.pt``, a training checkpoint, or a training output directory.
        settings: see :class:`EvalSettings`.
        config: optional; its model must match the checkpoint's (crop size is taken from it).
    Returns:
        The report (as written to ``eval.json``): settings, per-method probe/kNN results, flat
        ``metrics``, output paths and the MLflow run id (or None).
    Raises:
        FileNotFoundError, EvalError, DatasetNotFoundError, TrackingUnavailableError: bad input,
        each with a message naming what to fix.
    """
    from hjepa_core.data.sources import default_cache_dir
    from hjepa_core.train.engine import resolve_device

    settings = settings or EvalSettings()
    settings.probe.validate()
    loaded = load_encoder(checkpoint, config)
    pooling = check_pooling(settings.pooling, loaded.levels)
    dataset, data_path = _resolve_dataset(settings, loaded.config)
    try:
        device = resolve_device(settings.device)
    except RuntimeError as exc:
        raise EvalError(str(exc)) from exc
    train_source = open_source(dataset, data_path, "train", settings.max_train_samples)
    test_source = open_source(dataset, data_path, "test", settings.max_test_samples)
    output_dir = Path(settings.output_dir) if settings.output_dir else loaded.path.parent / "eval"
    cache_root = (Path(settings.cache_dir) if settings.cache_dir else default_cache_dir() / "features")
    cache = FeatureCache(cache_root if settings.use_cache else None)
    tracker, parent_run_id = _start_tracking(settings, loaded, dataset)
    try:
        report = _run(settings, loaded, pooling, dataset, data_path, device, train_source, test_source,
                      cache, output_dir)
        if tracker is not None:
            report["mlflow_run_id"] = tracker.run_id
            report["mlflow_parent_run_id"] = parent_run_id
            name = settings.registered_model_name
            name = loaded.config.tracking.registered_model_name if name is None else name
            if name:
                from hjepa_core.eval.registry import register_evaluated

                uri = settings.tracking_uri or loaded.config.tracking.tracking_uri
                report["registered_model"] = register_evaluated(report, loaded, test_source, name,
                                                                tracker.run_id, uri)
            atomic_write_text(output_dir / EVAL_FILE, json.dumps(report, indent=2))
            params = {f"pretrain.{k}": v for k, v in loaded.config.flat().items()}
            params.update({f"eval.{k}": v for k, v in report["settings"].items() if k != "probe"})
            params.update({f"eval.probe.{k}": v for k, v in report["settings"]["probe"].items()})
            tracker.log_params(params)
            tracker.log_metrics(report["metrics"])
            for name in (EVAL_FILE, CONFUSION_FILE, REPORT_FILE):
                tracker.log_artifact(output_dir / name)
            tracker.finish("FINISHED")
    except BaseException:
        if tracker is not None:
            tracker.finish("FAILED")
        raise
    return report


def _run(
    settings: EvalSettings, loaded: LoadedEncoder, pooling: str, dataset: str, data_path: str | None,
    device: torch.device, train_source: Any, test_source: Any, cache: FeatureCache, output_dir: Path,
) -> dict[str, Any]:
    crop = loaded.crop_size
    data_key = {"dataset": dataset, "data_path": str(Path(data_path).resolve()) if data_path else None,
                "crop_size": crop, "resize_ratio": 1.0}
    identities: dict[str, tuple[VisionTransformer | None, dict[str, Any]]] = {
        "encoder": (loaded.encoder, {"kind": "encoder", "sha256": loaded.sha256, "pooling": pooling}),
    }
    if loaded.context_encoder is not None:
        identities["context_encoder"] = (
            loaded.context_encoder,
            {"kind": "context_encoder", "sha256": loaded.sha256, "pooling": pooling},
        )
    if settings.baselines:
        identities["random_init"] = (
            _random_init_encoder(loaded, settings.random_init_seed),
            {"kind": "random_init", "arch": loaded.encoder.arch(), "seed": settings.random_init_seed,
             "pooling": pooling},
        )
        identities["pixels"] = (None, {"kind": "pixels", "pixel_size": settings.pixel_size})
    splits = {"train": (train_source, settings.max_train_samples), "test": (test_source, settings.max_test_samples)}
    integrity = {split: getattr(source, "integrity", None) for split, (source, _) in splits.items()}
    fingerprints = {split: data_fingerprint(dataset, data_path, split) for split in splits}
    methods: dict[str, dict[str, Any]] = {}
    labels: dict[str, Tensor] = {}
    classes: list[str] = []
    num_classes = 0
    for name, (encoder, identity) in identities.items():
        start = time.perf_counter()
        feats: dict[str, Tensor] = {}
        for split, (source, max_samples) in splits.items():
            key = {**identity, **data_key, "split": split, "max_samples": max_samples, "data": fingerprints[split]}
            compute = functools.partial(
                extract_features, encoder, source, crop, pooling=pooling, levels=loaded.levels, device=device,
                batch_size=settings.batch_size, num_workers=settings.num_workers, progress=settings.progress,
                desc=f"{name} features ({split})", pixel_size=settings.pixel_size,
            )
            intact = functools.partial(_intact, integrity[split])
            feats[split], split_labels = cache.get_or_compute(key, compute, intact)
            _check_data(integrity[split], settings, loaded, split)
            if split in labels and not torch.equal(labels[split], split_labels):
                raise EvalError(f"{split} labels differ between methods; the dataset changed during evaluation")
            labels[split] = split_labels
        if not classes:
            classes = source_classes(train_source, torch.cat([labels["train"], labels["test"]]))
            num_classes = len(classes)
            if len(labels["train"].unique()) < 2:
                raise EvalError(f"dataset {dataset!r}: the training split has fewer than 2 classes")
        extract_s = time.perf_counter() - start
        train_x, test_x = feats["train"], feats["test"]
        if name == "pixels":
            train_x, test_x = _drop_repeated_channels(train_x, test_x)
        train_x, test_x = train_x.float().to(device), test_x.float().to(device)
        start = time.perf_counter()
        probe = linear_probe(train_x, labels["train"], test_x, labels["test"], num_classes, settings.probe)
        probe_s = time.perf_counter() - start
        start = time.perf_counter()
        knn = knn_evaluate(train_x, labels["train"], test_x, labels["test"], num_classes,
                           settings.k, settings.temperature)
        methods[name] = {"probe": probe.to_dict(), "knn": knn, "feature_dim": int(train_x.shape[1]),
                         "seconds": {"features": round(extract_s, 2), "probe": round(probe_s, 2),
                                     "knn": round(time.perf_counter() - start, 2)}}
    methods, selected = _select_encoder(methods)
    data_loss = {split: table.summary() for split, table in integrity.items() if table is not None}
    metrics = flat_metrics(methods)
    metrics.update({f"data/{split}_lost_samples": loss["lost_samples"] for split, loss in data_loss.items()})
    report: dict[str, Any] = {
        "checkpoint": str(loaded.path),
        "selected_encoder": selected,
        "checkpoint_sha256": loaded.sha256,
        "dataset": dataset,
        "data_path": data_path,
        "crop_size": crop,
        "pooling": pooling,
        "num_train": len(labels["train"]),
        "num_test": len(labels["test"]),
        "num_classes": num_classes,
        "classes": classes,
        "settings": {**asdict(settings), "device": str(device),
                     "tracking_uri": redact_url(settings.tracking_uri) if settings.tracking_uri else None},
        "methods": methods,
        "metrics": metrics,
        "data_integrity": data_loss,
        "cache": {"hits": cache.hits, "misses": cache.misses, "dir": str(cache.root) if cache.root else None},
        "files": {"json": str(output_dir / EVAL_FILE), "confusion_matrix": str(output_dir / CONFUSION_FILE),
                  "report": str(output_dir / REPORT_FILE)},
        "mlflow_run_id": None,
        "mlflow_parent_run_id": None,
        "registered_model": None,
    }
    encoder_probe = methods["encoder"]["probe"]
    _plot_confusion(encoder_probe["confusion"], classes, output_dir / CONFUSION_FILE,
                    f"linear probe on {dataset} (test): top-1 {100 * encoder_probe['top1']:.2f}%")
    atomic_write_text(output_dir / REPORT_FILE, _markdown(report))
    atomic_write_text(output_dir / EVAL_FILE, json.dumps(report, indent=2))
    atomic_write_text(output_dir / EVAL_METRICS_FILE, json.dumps(report["metrics"], indent=2))
    return report
