"""The H-JEPA Kubeflow pipeline: shard -> pretrain -> evaluate, and its local runner.

``hjepa pipeline compile`` writes ``pipelines/hjepa_pipeline.yaml`` (kept in git, checked up to
date by a test); ``hjepa pipeline run-local`` runs the same components with KFP's
``SubprocessRunner`` in this Python environment. Kubernetes settings (GPUs, /dev/shm, PVC,
secrets) come from ``kfp-kubernetes`` and apply on a cluster only.
"""

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kfp import compiler, dsl, kubernetes

from hjepa_kfp.components import DEFAULT_IMAGE, build


def _source_root() -> Path:
    """The source checkout this package is installed from (editable), else the working directory."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "pyproject.toml").is_file() else Path.cwd()


REPO_ROOT = _source_root()
PIPELINE_NAME = "hjepa-pretraining"
COMPILED = REPO_ROOT / "pipelines" / "hjepa_pipeline.yaml"
DATA_MOUNT = "/mnt/hjepa"
SHM_SIZE = "16Gi"
RETRIES = 3
RUN_AS_USER = 1000  # the image's user (components/Dockerfile)
# Env names MLflow reads; the secret's keys are the same names (see manifests/ and README).
MLFLOW_SECRET_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
                      "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
EXECUTOR_OUTPUT = "executor_output.json"  # what the local runner leaves beside a task's outputs
MLFLOW_CONFIG_KEYS = {"MLFLOW_TRACKING_URI": "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL": "MLFLOW_S3_ENDPOINT_URL"}


def _mlflow_env(task: dsl.PipelineTask, config_map: Any, secret: Any) -> None:
    """MLflow URI (unless the ``mlflow_uri`` parameter is set) from a config map, credentials from a secret."""
    kubernetes.use_config_map_as_env(task, config_map, dict(MLFLOW_CONFIG_KEYS), optional=True)
    kubernetes.use_secret_as_env(task, secret, {k: k for k in MLFLOW_SECRET_KEYS}, optional=True)


def build_pipeline(image: str = DEFAULT_IMAGE, retries: int = RETRIES, cache_training: bool = False) -> Any:
    """The ``@dsl.pipeline`` with every component running in ``image``.

    Args:
        image: the container image of every task (a compile-time setting in KFP).
        retries: of a failed pretrain pod (it resumes from its checkpoints; 0 for local runs, where
            a retry repeats the error).
        cache_training: let KFP reuse ``pretrain`` and ``evaluate`` results for identical inputs
            (KFP takes caching as a compile-time bool). ``shard`` is always cacheable: its output
            depends only on its inputs (see :func:`hjepa_core.pipeline.shard_location`).
    """
    ops = build(image)

    @dsl.pipeline(name=PIPELINE_NAME, description="H-JEPA multi-crop pretraining: shard, pretrain, linear probe")
    def hjepa_pipeline(
        source: str = "fashion_mnist",
        data_path: str = "",
        max_samples: int = 0,
        max_test_samples: int = 0,
        config: str = "configs/fashion_mnist.yaml",
        config_overrides: list = [],  # noqa: B006 (a KFP parameter default, never mutated)
        global_crop_size: int = 0,
        local_crop_size: int = 0,
        num_local_crops: int = -1,
        strategy: str = "",
        epochs: int = 0,
        gpus: int = 1,
        accelerator_type: str = "nvidia.com/gpu",
        cpu_request: str = "8",
        memory_request: str = "32G",
        checkpoint_root: str = f"{DATA_MOUNT}/checkpoints",
        shard_root: str = f"{DATA_MOUNT}/shards",
        pvc_name: str = "hjepa-data",
        mlflow_uri: str = "",
        experiment: str = "hjepa-pipeline",
        mlflow_config_map: str = "mlflow-config",
        mlflow_secret: str = "mlflow-credentials",
        eval_max_train_samples: int = 10000,
        eval_max_test_samples: int = 2000,
        probe_epochs: int = 30,
        baselines: bool = True,
    ) -> float:
        shard = ops.shard(source=source, data_path=data_path, max_samples=max_samples,
                          max_test_samples=max_test_samples, shard_root=shard_root, mlflow_uri=mlflow_uri,
                          experiment=experiment).set_display_name("shard").set_caching_options(True)
        shard.set_cpu_request("2").set_memory_request("4G")

        pretrain = ops.pretrain(
            shards=shard.outputs["shards"], config=config, config_overrides=config_overrides, epochs=epochs,
            strategy=strategy, global_crop_size=global_crop_size, local_crop_size=local_crop_size,
            num_local_crops=num_local_crops, gpus=gpus, checkpoint_root=checkpoint_root, mlflow_uri=mlflow_uri,
            experiment=experiment,
        ).set_display_name("pretrain").set_caching_options(cache_training)
        pretrain.set_accelerator_type(accelerator_type).set_accelerator_limit(gpus)
        pretrain.set_cpu_request(cpu_request).set_memory_request(memory_request)
        if retries:
            pretrain.set_retry(retries, backoff_duration="60s", backoff_factor=2.0)
        kubernetes.empty_dir_mount(pretrain, volume_name="dshm", mount_path="/dev/shm", medium="Memory",
                                   size_limit=SHM_SIZE)

        evaluate = ops.evaluate(
            shards=shard.outputs["shards"], model=pretrain.outputs["model"],
            max_train_samples=eval_max_train_samples, max_test_samples=eval_max_test_samples,
            probe_epochs=probe_epochs, baselines=baselines, mlflow_uri=mlflow_uri, experiment=experiment,
        ).set_display_name("evaluate").set_caching_options(cache_training)
        evaluate.set_cpu_request("4").set_memory_request("8G")
        for task in (shard, pretrain, evaluate):
            # Every task reads or writes the data PVC (raw images, shards, checkpoints), runs as the
            # image's unprivileged user and reaches MLflow with the same config map and secret.
            kubernetes.mount_pvc(task, pvc_name=pvc_name, mount_path=DATA_MOUNT)
            kubernetes.set_security_context(task, run_as_user=RUN_AS_USER, run_as_non_root=True)
            _mlflow_env(task, mlflow_config_map, mlflow_secret)
        return evaluate.outputs["Output"]

    return hjepa_pipeline


def compile_pipeline(path: str | Path = COMPILED, image: str = DEFAULT_IMAGE, cache_training: bool = False) -> Path:
    """Compiles the pipeline to ``path`` (YAML) and returns it (``cache_training``: see :func:`build_pipeline`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(image, cache_training=cache_training), package_path=str(path))
    return path


@dataclass
class LocalRun:
    """A finished local pipeline run: the probe accuracy and where the artifacts are."""

    probe_top1: float
    run_dir: Path
    artifacts: dict[str, Path] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    """The evaluate stage's ``eval.json`` (methods, selected encoder, metrics)."""


def run_local(pipeline_root: str | Path, arguments: dict[str, Any], image: str = DEFAULT_IMAGE) -> LocalRun:
    """Runs the pipeline with KFP's ``SubprocessRunner`` in this Python environment.

    Kubernetes-only settings (GPUs, mounts, secrets) are ignored locally, and a failed stage is
    not retried; pass ``checkpoint_root`` (a local folder, or "" for a temporary one) and
    ``gpus=0``. ``shard_root`` (a local folder or an object-store URL) defaults to "" here: the
    shards stay in the ``shard`` task's artifact. The config and the source are checked before the
    first stage.
    Raises:
        ConfigError, DatasetNotFoundError: a bad config or source (before any stage runs).
        RuntimeError: a stage failed; the message is that stage's own error line.
    """
    from kfp import local

    from hjepa_core.eval.report import EVAL_FILE
    from hjepa_core.pipeline import ERROR_FILE, check_inputs, pipeline_overrides

    arguments = {"shard_root": "", **arguments}  # not the pipeline's default, a cluster's PVC path
    root = Path(pipeline_root).resolve()
    cwd = os.getcwd()
    os.chdir(REPO_ROOT)  # relative config paths resolve as in the image (WORKDIR is the repo copy)
    try:
        overrides = pipeline_overrides(
            [str(o) for o in arguments.get("config_overrides", [])], epochs=arguments.get("epochs", 0),
            strategy=arguments.get("strategy", ""), global_crop_size=arguments.get("global_crop_size", 0),
            local_crop_size=arguments.get("local_crop_size", 0), num_local_crops=arguments.get("num_local_crops", -1))
        check_inputs(arguments["source"], arguments.get("data_path") or None, arguments.get("config") or None,
                     overrides)
        root.mkdir(parents=True, exist_ok=True)
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True)
        before = {p for p in root.iterdir() if p.is_dir()}
        try:
            task = build_pipeline(image, retries=0)(**arguments)
        except RuntimeError as exc:
            new = _new_dirs(root, before)
            errors = sorted(new[-1].rglob(ERROR_FILE), key=lambda p: p.stat().st_mtime) if new else []
            if errors:
                raise RuntimeError(errors[-1].read_text().strip()) from exc
            raise
    finally:
        os.chdir(cwd)
    new = _new_dirs(root, before)
    run_dir = new[-1] if new else root
    artifacts = {f"{p.parent.name}/{p.name}": p for p in run_dir.glob("*/*") if p.name != EXECUTOR_OUTPUT}
    report = artifacts["evaluate/evaluation"] / EVAL_FILE
    return LocalRun(float(task.output), run_dir, artifacts, json.loads(report.read_text()))


def _new_dirs(root: Path, before: set[Path]) -> list[Path]:
    """The run folders under ``root`` that were not in ``before``, oldest first."""
    return sorted((p for p in root.iterdir() if p.is_dir() and p not in before), key=lambda p: p.stat().st_mtime)
