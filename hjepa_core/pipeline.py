"""The pipeline stages (shard, pretrain, evaluate) as plain functions.

The Kubeflow components (:mod:`hjepa_kfp.components`, a separate package this library never
imports) are thin wrappers over these, so the CLI, DVC and KFP share one implementation. Each
stage logs one MLflow child run under one parent run per pipeline run; the parent is found (or
created) by the ``kfp.run_id`` tag, so stages running in separate pods agree on it without
passing ids around. The Kubeflow components read that id from their output artifacts' URIs
(:func:`run_id_from_uri`): no task takes it as an input, so a task's cache can hit. Secrets never
pass through here: MLflow reads its credentials (``MLFLOW_TRACKING_USERNAME``/``PASSWORD``,
``AWS_*``) from the environment.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hjepa_core.tracking import (
    ExperimentNotFoundError,
    MlflowTracker,
    NullTracker,
    resolve_tracking_uri,
    search_runs,
)
from hjepa_core.utils import make_dirs

KFP_RUN_TAG = "kfp.run_id"
STAGE_TAG = "hjepa.stage"
PIPELINE_STAGE = "pipeline"
STAGE_FILE = "stage.json"  # what a stage hands to the next one (run ids, counts), next to its outputs
ERROR_FILE = "error.txt"  # a failed stage's own error line, next to its outputs (run-local ends with it)
CONFIG_FILE = "config.yaml"


@dataclass
class StageTracking:
    """Where a stage logs: ``uri`` empty means ``MLFLOW_TRACKING_URI``; neither means no tracking."""

    uri: str | None = None
    experiment: str = "hjepa-pipeline"
    kfp_run_id: str = "local"

    @property
    def resolved_uri(self) -> str | None:
        return resolve_tracking_uri(self.uri)

    @property
    def enabled(self) -> bool:
        return self.resolved_uri is not None


def parent_run(tracking: StageTracking) -> str | None:
    """The MLflow parent run of this pipeline run (by its ``kfp.run_id`` tag), created if missing."""
    if not tracking.enabled:
        return None
    query = f"tags.`{KFP_RUN_TAG}` = '{tracking.kfp_run_id}' and tags.`{STAGE_TAG}` = '{PIPELINE_STAGE}'"
    try:
        runs = search_runs(tracking.experiment, tracking.resolved_uri, filter_string=query)
    except ExperimentNotFoundError:
        runs = []
    if runs:
        return runs[-1].run_id  # the oldest, should two stages ever race
    tracker = MlflowTracker(tracking.experiment, run_name=f"pipeline-{tracking.kfp_run_id}",
                            tracking_uri=tracking.resolved_uri,
                            tags={KFP_RUN_TAG: tracking.kfp_run_id, STAGE_TAG: PIPELINE_STAGE})
    return tracker.run_id


def _stage_tracker(tracking: StageTracking, stage: str, parent: str | None) -> Any:
    if parent is None:
        return NullTracker()
    return MlflowTracker(tracking.experiment, run_name=f"{stage}-{tracking.kfp_run_id}",
                         tracking_uri=tracking.resolved_uri, parent_run_id=parent,
                         tags={KFP_RUN_TAG: tracking.kfp_run_id, STAGE_TAG: stage})


def _end_parent(tracking: StageTracking, parent: str | None, status: str) -> None:
    if parent is None:
        return
    MlflowTracker.for_run(parent, tracking.resolved_uri).finish(status)


def _write_stage(folder: Path, info: dict[str, Any]) -> None:
    from hjepa_core.utils import atomic_write_text

    atomic_write_text(folder / STAGE_FILE, json.dumps(info, indent=2))


def _record_failure(folder: str | Path, stage: str, error: BaseException) -> None:
    """Writes ``STAGE: message`` (one line) to ``folder/error.txt``, best effort, so that a runner
    that only sees the stage's exit code (``hjepa pipeline run-local``) can end with it."""
    from hjepa_core.utils import atomic_write_text

    line = " ".join(str(error).split()) or type(error).__name__
    with contextlib.suppress(OSError):
        atomic_write_text(Path(folder) / ERROR_FILE, f"{stage}: {line}\n")


def check_inputs(source: str, data_path: str | None, config_path: str | None, overrides: list[str]) -> None:
    """Checks a pipeline run's inputs before its first stage, so a bad one fails in seconds with
    one line and no shard written: the config with the pretrain stage's overrides (validated, and
    its device available) and the source's name and files.

    Raises:
        ConfigError: a bad config, override or device; DatasetNotFoundError: a missing source folder.
    """
    from hjepa_core.config import ConfigError, load_config
    from hjepa_core.data.sources import DATASET_NAMES, DatasetNotFoundError

    load_config(config_path, [*overrides, "data.dataset=shards:pending"]).check_environment()
    name, _, inline = source.partition(":")
    if name.lower().replace("-", "_") not in DATASET_NAMES:
        raise ConfigError(f"source {source!r} is not a dataset the shard stage reads; use one of "
                          f"{', '.join(DATASET_NAMES)} (imagefolder:PATH)")
    folder = inline or data_path
    if folder and not Path(folder).exists():
        raise DatasetNotFoundError(f"source {source!r}: {folder} does not exist; pass the folder holding the images")


def read_stage(folder: str | Path) -> dict[str, Any]:
    """What the stage that wrote ``folder`` recorded (empty when nothing)."""
    path = Path(folder) / STAGE_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def run_id_from_uri(uri: str, task: str) -> str:
    """The pipeline run id in the URI KFP gave one of ``task``'s output artifacts.

    KFP names outputs ``<pipeline root>/<pipeline name>/<run id>/<task>[/<salt>]/<output>`` on a
    cluster and ``<root>/<pipeline name>-<timestamp>/<task>/<output>`` locally: the folder above
    the task's is the run. Stages read their run id here instead of taking
    ``dsl.PIPELINE_JOB_ID_PLACEHOLDER`` as an input, which differs every run and so would keep a
    task's cache from ever hitting.

    Raises:
        ValueError: ``uri`` has no ``task`` folder (not a KFP output URI).
    """
    parts = [part for part in uri.split("/") if part]
    for index in range(len(parts) - 1, 0, -1):
        if parts[index] == task:
            return parts[index - 1]
    raise ValueError(f"{uri}: no {task!r} folder, so no pipeline run id (not a KFP output artifact URI)")


def shard_location(shard_root: str, shards_uri: str) -> str:
    """Where the ``shard`` task writes: ``<shard_root>/<id of the run whose shard task ran>``.

    The id comes from the ``Dataset`` artifact's URI, not from an input, so the task stays
    cacheable. A cache hit hands a later run the first run's artifact and its recorded
    location, a folder only that run's shard task ever wrote (a retry of it rewrites the same
    bytes), so it stays whole and valid for as long as it is kept; keying by the inputs instead
    would let another run with the same inputs rewrite a folder that a cached run is reading.
    Delete a run's shard folder only with its KFP cache entry (or run without caching).
    """
    return f"{shard_root.rstrip('/')}/{run_id_from_uri(shards_uri, 'shard')}"


def shard_stage(
    source: str, out: str | Path, record_dir: str | Path, tracking: StageTracking, *, data_path: str | None = None,
    max_samples: int | None = None, max_test_samples: int | None = None, samples_per_shard: int | None = None,
) -> dict[str, Any]:
    """Writes the train and test splits of ``source`` as shards to ``out``; returns the manifest.

    ``out`` is a local folder (a PVC path, or the stage's own output folder) or an object-store URL
    (``s3://...``: written to a temporary folder, then uploaded, manifest last). ``record_dir``, a
    local folder that may be ``out``, gets ``stage.json`` (MLflow run ids and ``location``: ``out``)
    or, on failure, ``error.txt``.

    Raises:
        DatasetNotFoundError, ValueError, OSError: bad source; RuntimeError: no readable images;
        ImportError: no fsspec package for ``out``'s scheme.
    """
    from hjepa_core.data.shards import MANIFEST_NAME, write_shards
    from hjepa_core.data.shards.spec import local_path
    from hjepa_core.data.shards.upload import upload_shards

    record, local = Path(record_dir), local_path(str(out))
    parent = parent_run(tracking)
    tracker = _stage_tracker(tracking, "shard", parent)
    try:
        with tempfile.TemporaryDirectory(prefix="hjepa-shards-") as scratch:
            folder = local if local is not None else Path(scratch)
            manifest: dict[str, Any] = {}
            for split, limit in (("train", max_samples), ("test", max_test_samples)):
                manifest = write_shards(source, folder, split, data_path=data_path, max_samples=limit,
                                        samples_per_shard=samples_per_shard, progress=False)
                if manifest["splits"][split]["num_samples"] == 0:
                    raise RuntimeError(f"shard: no readable images in the {split} split of {source!r}")
            if local is None:
                upload_shards(folder, str(out))
            tracker.log_params({"source": source, "data_path": data_path, "max_samples": max_samples,
                                "max_test_samples": max_test_samples, "location": str(out)})
            tracker.log_metrics({f"{split}_{key}": float(info[key]) for split, info in manifest["splits"].items()
                                 for key in ("num_samples", "num_skipped")})
            tracker.log_artifact(folder / MANIFEST_NAME)
        tracker.finish("FINISHED")
    except BaseException as exc:
        _record_failure(record, "shard", exc)
        tracker.finish("FAILED")
        _end_parent(tracking, parent, "FAILED")
        raise
    make_dirs(record)
    _write_stage(record, {"mlflow_parent_run_id": parent, "mlflow_run_id": tracker.run_id, "location": str(out)})
    return manifest


def pipeline_overrides(
    overrides: list[str] | None = None, *, epochs: int = 0, strategy: str = "", global_crop_size: int = 0,
    local_crop_size: int = 0, num_local_crops: int = -1,
) -> list[str]:
    """Config overrides from the pipeline's parameters (0 / -1 / empty: keep the config's value;
    an epoch count means an epoch schedule)."""
    from hjepa_core.constants import EPOCH_SCHEDULE

    result = [EPOCH_SCHEDULE] if epochs else []
    result += overrides or []
    for key, value, unset in (("training.epochs", epochs, 0), ("masking.strategy", strategy, ""),
                              ("data.multicrop.global_crop_size", global_crop_size, 0),
                              ("data.multicrop.local_crop_size", local_crop_size, 0),
                              ("data.multicrop.num_local_crops", num_local_crops, -1)):
        if value != unset:
            result.append(f"{key}={value}")
    return result


def train_command(config_path: str | Path, nproc: int) -> list[str]:
    """``torchrun`` on one node with ``nproc`` processes, resuming from the newest checkpoint."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "hjepa_core.cli", "train", "--config", str(config_path), "--resume", "auto", "--no-progress"]


def pretrain_stage(
    config_path: str | None, overrides: list[str], shards_dir: str | Path, work_dir: str | Path | None,
    model_dir: str | Path, tracking: StageTracking, *, gpus: int = 0,
) -> dict[str, Any]:
    """Pretrains on the shards into ``work_dir`` (resuming from its checkpoints) and copies the
    encoder and resolved config to ``model_dir``. ``gpus`` > 1 runs torchrun on this node.

    ``work_dir`` None: a temporary folder, deleted afterwards (no resume on a retry), so that no
    file is left outside ``model_dir`` (a cluster uploads only a step's declared outputs).
    Returns:
        metadata: steps, final loss, MLflow run ids, model size.
    Raises:
        RuntimeError: the run was pre-empted (the checkpoint is saved; a retry resumes) or torchrun failed.
    """
    kept = work_dir is not None
    scratch = contextlib.nullcontext(str(work_dir)) if kept else tempfile.TemporaryDirectory(prefix="hjepa-pretrain-")
    with scratch as folder:
        return _pretrain(config_path, overrides, shards_dir, Path(folder), Path(model_dir), tracking, gpus, kept=kept)


def _pretrain(
    config_path: str | None, overrides: list[str], shards_dir: str | Path, work: Path, model: Path,
    tracking: StageTracking, gpus: int, *, kept: bool,
) -> dict[str, Any]:
    """:func:`pretrain_stage` in ``work``; ``kept``: ``work`` outlives the stage (a retry resumes there)."""
    from hjepa_core.config import load_config
    from hjepa_core.train.engine import ENCODER_FILE, METRICS_FILE

    make_dirs(work)
    config = load_config(config_path, [*overrides, f"data.dataset=shards:{shards_dir}",
                                       f"training.output_dir={work}"])
    parent = parent_run(tracking)
    config.tracking.enabled = parent is not None
    config.tracking.tracking_uri = tracking.resolved_uri
    config.tracking.experiment = tracking.experiment
    config.tracking.parent_run_id = parent
    config.tracking.run_name = f"pretrain-{tracking.kfp_run_id}"
    config.tracking.tags = {**config.tracking.tags, KFP_RUN_TAG: tracking.kfp_run_id, STAGE_TAG: "pretrain"}
    resolved = config.save(work / CONFIG_FILE)
    where = (f"checkpoints in {work / 'checkpoints'}, a retry resumes from them" if kept
             else "no checkpoint kept (a temporary folder): set a checkpoint root to resume on a retry")
    try:
        if gpus > 1:
            # config.yaml holds the URI without credentials: the processes get the full one from the env.
            uri = tracking.resolved_uri if parent else None
            env = {**os.environ, **({"MLFLOW_TRACKING_URI": uri} if uri else {})}
            code = subprocess.run(train_command(resolved, gpus), check=False, env=env).returncode
            if code != 0:
                raise RuntimeError(f"pretrain: torchrun exited with {code}; {where}")
            summary = json.loads((work / METRICS_FILE).read_text())
            run_id = _find_stage_run(tracking, "pretrain") if parent else None
        else:
            from hjepa_core.eval.knn_monitor import epoch_monitor
            from hjepa_core.train import train

            result = train(config, resume="auto", progress=False, monitor=epoch_monitor(config))
            if result.preempted:
                raise RuntimeError(f"pretrain: pre-empted at step {result.steps}; {where}")
            summary, run_id = result.metrics, result.run_id
    except BaseException as exc:
        _record_failure(model, "pretrain", exc)
        _end_parent(tracking, parent, "FAILED")
        raise
    make_dirs(model)
    for name in (ENCODER_FILE, CONFIG_FILE, METRICS_FILE):
        shutil.copy2(work / name, model / name)
    info = {"mlflow_parent_run_id": parent, "mlflow_run_id": run_id, "steps": int(summary.get("steps", 0)),
            "final_loss": summary.get("final_loss"), "encoder": config.model.encoder,
            "embed_dim": config.model.embed_dim, "strategy": config.masking.strategy,
            "encoder_bytes": (model / ENCODER_FILE).stat().st_size}
    _write_stage(model, info)
    return info


def _find_stage_run(tracking: StageTracking, stage: str) -> str | None:
    query = f"tags.`{KFP_RUN_TAG}` = '{tracking.kfp_run_id}' and tags.`{STAGE_TAG}` = '{stage}'"
    runs = search_runs(tracking.experiment, tracking.resolved_uri, filter_string=query)
    return runs[0].run_id if runs else None


def evaluate_stage(
    model_dir: str | Path, shards_dir: str | Path, out_dir: str | Path, tracking: StageTracking, *,
    max_train_samples: int | None = None, max_test_samples: int | None = None, probe_epochs: int = 30,
    baselines: bool = True,
) -> dict[str, Any]:
    """Linear probe + kNN of the pretrained encoder on the shards' train/test splits.

    Ends the pipeline's MLflow parent run (FINISHED, or FAILED with the stage).
    Returns:
        the evaluation report (see :func:`hjepa_core.eval.evaluate`).
    """
    from hjepa_core.eval import EvalSettings, ProbeSettings, evaluate
    from hjepa_core.train.engine import ENCODER_FILE

    parent = parent_run(tracking)
    settings = EvalSettings(
        dataset=f"shards:{shards_dir}", max_train_samples=max_train_samples, max_test_samples=max_test_samples,
        probe=ProbeSettings(epochs=probe_epochs), baselines=baselines, output_dir=str(out_dir), progress=False,
        use_cache=False, tracking=parent is not None, tracking_uri=tracking.resolved_uri,
        experiment=tracking.experiment, parent_run_id=parent,
    )
    try:
        report = evaluate(Path(model_dir) / ENCODER_FILE, settings)
    except BaseException as exc:
        _record_failure(out_dir, "evaluate", exc)
        _end_parent(tracking, parent, "FAILED")
        raise
    if report.get("mlflow_run_id") and parent is not None:  # evaluate tracks only under a parent
        tags = {KFP_RUN_TAG: tracking.kfp_run_id, "mlflow.runName": f"evaluate-{tracking.kfp_run_id}"}
        pretrain_run = read_stage(model_dir).get("mlflow_run_id")
        if pretrain_run:
            tags["hjepa.pretrain_run_id"] = pretrain_run
        MlflowTracker.for_run(report["mlflow_run_id"], tracking.resolved_uri).set_tags(tags)
        MlflowTracker.for_run(parent, tracking.resolved_uri).log_metrics(
            {"probe_top1": float(report["metrics"]["probe_top1"])})
    _end_parent(tracking, parent, "FINISHED")
    return report
