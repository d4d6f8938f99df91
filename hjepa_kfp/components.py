"""The three KFP components: thin wrappers whose bodies call :mod:`hjepa_core.pipeline`.

They are lightweight components run in the one hjepa image (``components/Dockerfile``), which
already holds kfp, so ``install_kfp_package=False``. A function body runs in the container on
its own: it imports everything it uses. :func:`build` binds them to an image.
"""

from dataclasses import dataclass
from typing import Any

from kfp import dsl
from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

DEFAULT_IMAGE = "ghcr.io/hjepa/hjepa:0.1.0"


def shard(
    source: str,
    data_path: str,
    max_samples: int,
    max_test_samples: int,
    shard_root: str,
    mlflow_uri: str,
    experiment: str,
    shards: Output[Dataset],
) -> None:
    """Writes the source's train and test splits as WebDataset shards (0 samples: all) under
    ``shard_root`` (see :func:`~hjepa_core.pipeline.shard_location`), or into ``shards`` when it is
    empty; the artifact's ``location`` and ``manifest`` metadata say where they are."""
    from hjepa_core.data.shards import MANIFEST_NAME
    from hjepa_core.pipeline import StageTracking, run_id_from_uri, shard_location, shard_stage

    location = shard_location(shard_root, shards.uri) if shard_root else shards.path
    tracking = StageTracking(mlflow_uri, experiment, run_id_from_uri(shards.uri, "shard"))
    manifest = shard_stage(source, location, shards.path, tracking, data_path=data_path or None,
                           max_samples=max_samples or None, max_test_samples=max_test_samples or None)
    if shard_root:
        shards.metadata["location"] = location
        shards.metadata["manifest"] = f"{location}/{MANIFEST_NAME}"
    shards.metadata["source"] = source
    shards.metadata["classes"] = manifest.get("classes", [])
    for split, info in manifest["splits"].items():
        shards.metadata[f"{split}_samples"] = info["num_samples"]
        shards.metadata[f"{split}_skipped"] = info["num_skipped"]
        shards.metadata[f"{split}_shards"] = len(info["shards"])


def pretrain(
    shards: Input[Dataset],
    config: str,
    config_overrides: list,
    epochs: int,
    strategy: str,
    global_crop_size: int,
    local_crop_size: int,
    num_local_crops: int,
    gpus: int,
    checkpoint_root: str,
    mlflow_uri: str,
    experiment: str,
    model: Output[Model],
    metrics: Output[Metrics],
) -> None:
    """H-JEPA pretraining on the shards; resumes from ``checkpoint_root/<run id>`` on a retry
    (no ``checkpoint_root``: a temporary folder)."""
    import os

    from hjepa_core.pipeline import StageTracking, pipeline_overrides, pretrain_stage, run_id_from_uri

    overrides = pipeline_overrides([str(o) for o in config_overrides], epochs=epochs, strategy=strategy,
                                   global_crop_size=global_crop_size, local_crop_size=local_crop_size,
                                   num_local_crops=num_local_crops)
    run_id = run_id_from_uri(model.uri, "pretrain")
    work = os.path.join(checkpoint_root, run_id, "pretrain") if checkpoint_root else None
    info = pretrain_stage(config or None, overrides, shards.metadata.get("manifest") or shards.path, work,
                          model.path, StageTracking(mlflow_uri, experiment, run_id), gpus=gpus)
    for key, value in info.items():
        if value is not None:
            model.metadata[key] = value
    metrics.log_metric("steps", info["steps"])
    if info["final_loss"] is not None:
        metrics.log_metric("final_loss", float(info["final_loss"]))


def evaluate(
    shards: Input[Dataset],
    model: Input[Model],
    max_train_samples: int,
    max_test_samples: int,
    probe_epochs: int,
    baselines: bool,
    mlflow_uri: str,
    experiment: str,
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
    report: Output[Markdown],
    evaluation: Output[Artifact],
) -> float:
    """Linear probe + kNN of the frozen encoder; returns the probe's top-1 accuracy. Every file it
    writes (``eval.json``, the confusion PNG, the report) is in ``evaluation``."""
    import shutil

    from hjepa_core.pipeline import StageTracking, evaluate_stage, run_id_from_uri

    tracking = StageTracking(mlflow_uri, experiment, run_id_from_uri(evaluation.uri, "evaluate"))
    result = evaluate_stage(model.path, shards.metadata.get("manifest") or shards.path, evaluation.path, tracking,
                            max_train_samples=max_train_samples or None, max_test_samples=max_test_samples or None,
                            probe_epochs=probe_epochs, baselines=baselines)
    for key, value in result["metrics"].items():
        if "/" not in key:
            metrics.log_metric(key, float(value))
    probe = result["methods"]["encoder"]["probe"]
    confusion.log_confusion_matrix([str(c) for c in result["classes"]], probe["confusion"])
    shutil.copyfile(result["files"]["report"], report.path)
    return float(result["metrics"]["probe_top1"])


@dataclass(frozen=True)
class Components:
    """The components bound to one image."""

    shard: Any
    pretrain: Any
    evaluate: Any


def build(image: str = DEFAULT_IMAGE) -> Components:
    """The three components running in ``image``."""
    wrap = dsl.component(base_image=image, install_kfp_package=False)
    return Components(shard=wrap(shard), pretrain=wrap(pretrain), evaluate=wrap(evaluate))
