"""The compiled pipeline: up to date with the source, the Kubernetes settings it carries, caching,
and where the shards go."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format

pytest.importorskip("kfp.kubernetes")

from kfp.kubernetes import kubernetes_executor_config_pb2 as k8s_pb2
from kfp.pipeline_spec import pipeline_spec_pb2

from hjepa_core.cli import main
from hjepa_core.pipeline import pipeline_overrides, run_id_from_uri, shard_location, train_command
from hjepa_kfp.pipeline import COMPILED, MLFLOW_SECRET_KEYS, compile_pipeline

TASKS = ("shard", "pretrain", "evaluate")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_pipeline(tmp_path_factory.mktemp("compiled") / "pipeline.yaml")


def _specs(path: Path) -> tuple[pipeline_spec_pb2.PipelineSpec, dict[str, k8s_pb2.KubernetesExecutorConfig]]:
    pipeline_doc, platform_doc = yaml.safe_load_all(path.read_text())
    spec = json_format.ParseDict(pipeline_doc, pipeline_spec_pb2.PipelineSpec())
    executors = platform_doc["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    return spec, {name: json_format.ParseDict(cfg, k8s_pb2.KubernetesExecutorConfig())
                  for name, cfg in executors.items()}


def test_committed_yaml_is_up_to_date(compiled: Path) -> None:
    assert COMPILED.is_file(), "pipelines/hjepa_pipeline.yaml is missing: run `hjepa pipeline compile`"
    assert list(yaml.safe_load_all(COMPILED.read_text())) == list(yaml.safe_load_all(compiled.read_text())), (
        "pipelines/hjepa_pipeline.yaml is out of date with hjepa_kfp/: run `hjepa pipeline compile`"
    )


def test_parameters_and_stages(compiled: Path) -> None:
    spec, _ = _specs(compiled)
    params = spec.root.input_definitions.parameters
    for name in ("source", "config", "config_overrides", "global_crop_size", "local_crop_size", "num_local_crops",
                 "strategy", "epochs", "gpus", "accelerator_type", "mlflow_uri", "experiment", "shard_root"):
        assert name in params, name
    assert set(spec.root.dag.tasks) == set(TASKS)
    assert set(spec.root.dag.tasks["evaluate"].dependent_tasks) == {"pretrain", "shard"}
    outputs = spec.components["comp-evaluate"].output_definitions.artifacts
    assert outputs["confusion"].artifact_type.schema_title == "system.ClassificationMetrics"
    assert outputs["report"].artifact_type.schema_title == "system.Markdown"
    # eval.json, the confusion PNG and the report: a declared output, uploaded by a cluster's launcher
    assert outputs["evaluation"].artifact_type.schema_title == "system.Artifact"
    assert spec.components["comp-pretrain"].output_definitions.artifacts["model"].artifact_type.schema_title == \
        "system.Model"
    image = spec.deployment_spec["executors"]["exec-pretrain"]["container"]["image"]
    assert image.startswith("ghcr.io/")


def test_shard_root_reaches_every_stage(compiled: Path) -> None:
    """shard writes under shard_root; pretrain and evaluate find the shards through its artifact."""
    spec, _ = _specs(compiled)
    assert spec.root.input_definitions.parameters["shard_root"].default_value.string_value == "/mnt/hjepa/shards"
    tasks = spec.root.dag.tasks
    assert tasks["shard"].inputs.parameters["shard_root"].component_input_parameter == "shard_root"
    for name in ("pretrain", "evaluate"):
        shards = tasks[name].inputs.artifacts["shards"].task_output_artifact
        assert (shards.producer_task, shards.output_artifact_key) == ("shard", "shards")


def test_caching_shard_always_training_by_choice(compiled: Path, tmp_path: Path) -> None:
    """No task takes the run id (it would change every run's cache key); shard is cacheable, pretrain
    and evaluate only when compiled with cache_training."""
    assert "pipeline_job_uuid" not in compiled.read_text()
    spec, _ = _specs(compiled)
    tasks = spec.root.dag.tasks
    assert not any("run_id" in name for task in tasks.values() for name in task.inputs.parameters)
    assert [tasks[name].caching_options.enable_cache for name in TASKS] == [True, False, False]
    assert main(["pipeline", "compile", "--output", str(tmp_path / "cached.yaml"), "--cache_training"]) == 0
    cached, _ = _specs(tmp_path / "cached.yaml")
    assert [cached.root.dag.tasks[name].caching_options.enable_cache for name in TASKS] == [True, True, True]


def test_every_task_mounts_the_pvc_and_runs_as_non_root(compiled: Path) -> None:
    _, k8s = _specs(compiled)
    assert set(k8s) == {f"exec-{name}" for name in TASKS}
    for name, executor in k8s.items():
        (pvc,) = executor.pvc_mount
        assert pvc.mount_path == "/mnt/hjepa", name
        assert pvc.pvc_name_parameter.component_input_parameter == "pvc_name", name
        context = executor.security_context
        assert (context.run_as_non_root, context.run_as_user) == (True, 1000), name


def test_run_id_and_shard_location_from_artifact_uris() -> None:
    cluster = "minio://mlpipeline/v2/artifacts/hjepa-pretraining/5f0c-run/shard/8731/shards"
    assert run_id_from_uri(cluster, "shard") == "5f0c-run"
    assert run_id_from_uri("s3://b/root/hjepa-pretraining/r-1/pretrain/model", "pretrain") == "r-1"
    local = "/tmp/root/hjepa-pretraining-2026-01-02-03-04-05-000006/evaluate/evaluation"
    assert run_id_from_uri(local, "evaluate") == "hjepa-pretraining-2026-01-02-03-04-05-000006"
    assert shard_location("/mnt/hjepa/shards/", cluster) == "/mnt/hjepa/shards/5f0c-run"
    assert shard_location("s3://bucket/shards", cluster) == "s3://bucket/shards/5f0c-run"
    with pytest.raises(ValueError, match="no 'shard' folder"):
        run_id_from_uri("/tmp/somewhere/shards", "shard")


def test_pretrain_gpu_retry_shm_pvc_and_secrets(compiled: Path) -> None:
    spec, k8s = _specs(compiled)
    task = spec.root.dag.tasks["pretrain"]
    assert task.retry_policy.max_retry_count == 3
    resources = spec.deployment_spec["executors"]["exec-pretrain"]["container"]["resources"]
    assert "pipelinechannel--gpus" in resources["accelerator"]["resourceCount"]
    assert "pipelinechannel--accelerator_type" in resources["accelerator"]["resourceType"]
    assert "pipelinechannel--cpu_request" in resources["resourceCpuRequest"]
    pretrain = k8s["exec-pretrain"]
    shm = pretrain.empty_dir_mounts[0]
    assert (shm.mount_path, shm.medium) == ("/dev/shm", "Memory")
    pvc = pretrain.pvc_mount[0]
    assert pvc.mount_path == "/mnt/hjepa"
    assert pvc.pvc_name_parameter.component_input_parameter == "pvc_name"
    for name in ("exec-shard", "exec-pretrain", "exec-evaluate"):
        secret = k8s[name].secret_as_env[0]
        assert secret.secret_name_parameter.component_input_parameter == "mlflow_secret"
        assert {e.env_var for e in secret.key_to_env} == set(MLFLOW_SECRET_KEYS)
        config_map = k8s[name].config_map_as_env[0]
        assert "MLFLOW_TRACKING_URI" in {e.env_var for e in config_map.key_to_env}


def test_no_secret_values_in_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "do-not-leak-7f3a")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-leak-7f3a")
    text = compile_pipeline(tmp_path / "p.yaml").read_text()
    assert "do-not-leak" not in text
    pipeline_doc, _ = yaml.safe_load_all(text)
    for executor in pipeline_doc["deploymentSpec"]["executors"].values():
        for env in executor["container"].get("env", []):
            assert not any(word in env["name"].upper() for word in ("PASSWORD", "SECRET", "TOKEN")), env


def test_overrides_and_torchrun_command() -> None:
    assert pipeline_overrides(["a=1"], epochs=3, strategy="cross_crop_prediction", local_crop_size=48) == [
        "training.time_budget_s=null", "a=1", "training.epochs=3", "masking.strategy=cross_crop_prediction",
        "data.multicrop.local_crop_size=48"]
    assert pipeline_overrides(None) == []
    assert pipeline_overrides(["training.time_budget_s=60"], epochs=2)[:2] == [  # an explicit budget still wins
        "training.time_budget_s=null", "training.time_budget_s=60"]
    cmd = train_command("/w/config.yaml", 4)
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--standalone"]
    assert "--nproc_per_node=4" in cmd and cmd[-4:] == ["/w/config.yaml", "--resume", "auto", "--no-progress"]
