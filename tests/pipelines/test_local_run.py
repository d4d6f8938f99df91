"""The whole pipeline run locally (KFP SubprocessRunner) against a real MLflow server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.tiny import TINY_OVERRIDES

pytest.importorskip("kfp")
pytest.importorskip("mlflow")

from hjepa_core.cli import main
from hjepa_kfp.components import build
from hjepa_kfp.pipeline import EXECUTOR_OUTPUT, run_local

ROOT = Path(__file__).resolve().parents[2]

EXPERIMENT = "hjepa-pipeline-test"
MODEL_NAME = "hjepa-encoder-pipeline-test"
TINY = [o for o in TINY_OVERRIDES if not o.startswith(("data.max_samples", "tracking."))]


def _arguments(uri: str, model_name: str = MODEL_NAME, **changes: object) -> dict[str, object]:
    arguments: dict[str, object] = {
        "source": "fashion_mnist", "max_samples": 96, "max_test_samples": 48,
        "config": "configs/fashion_mnist.yaml", "config_overrides": [*TINY, "training.max_steps=2",
                             f"tracking.registered_model_name={model_name}"],
        "strategy": "cross_crop_prediction", "local_crop_size": 16, "gpus": 0, "checkpoint_root": "",
        "mlflow_uri": uri, "experiment": EXPERIMENT, "eval_max_train_samples": 96, "eval_max_test_samples": 48,
        "probe_epochs": 2, "baselines": False,
    }
    arguments.update(changes)
    return arguments


def _declared_outputs() -> dict[str, set[str]]:
    """Each task's declared output artifacts: the only files a cluster's launcher uploads."""
    ops = build()
    return {name: {key for key, spec in getattr(ops, name).component_spec.outputs.items()
                   if spec.type.startswith("system.")}
            for name in ("shard", "pretrain", "evaluate")}


@pytest.mark.slow
@pytest.mark.parametrize("shard_root", ["", "folder"])
def test_pipeline_runs_locally_and_logs_to_mlflow(
    tmp_path: Path, mlflow_server: str, fashion_mnist_train: object, shard_root: str
) -> None:
    """Shards in the shard artifact (shard_root ""), or in a folder the artifact points to; every
    file a stage writes is inside one of its declared outputs."""
    import mlflow

    experiment, model_name = (f"{name}-{shard_root or 'artifact'}" for name in (EXPERIMENT, MODEL_NAME))
    root = str(tmp_path / "shards") if shard_root else ""
    run = run_local(tmp_path / "root", _arguments(mlflow_server, model_name, shard_root=root, experiment=experiment))
    assert 0.0 <= run.probe_top1 <= 1.0
    declared = _declared_outputs()
    assert {p.name for p in run.run_dir.iterdir()} == set(declared)
    for task, outputs in declared.items():
        written = {p.name for p in (run.run_dir / task).iterdir()} - {EXECUTOR_OUTPUT}
        assert written <= outputs, f"{task} wrote outside its outputs: {written - outputs}"
    shards, model = run.artifacts["shard/shards"], run.artifacts["pretrain/model"]
    location = tmp_path / "shards" / run.run_dir.name if shard_root else shards
    if shard_root:  # the artifact only records where the shards are
        assert {p.name for p in shards.iterdir()} == {"stage.json"}
        assert json.loads((shards / "stage.json").read_text())["location"] == str(location)
        assert [p.name for p in (tmp_path / "shards").iterdir()] == [run.run_dir.name]
    manifest = json.loads((location / "manifest.json").read_text())
    assert manifest["splits"]["train"]["num_samples"] == 96 and manifest["splits"]["test"]["num_samples"] == 48
    assert len(list(location.glob("*.tar"))) == len(manifest["splits"]["train"]["shards"]) + len(
        manifest["splits"]["test"]["shards"])
    read_from = f"shards:{location / 'manifest.json'}" if shard_root else f"shards:{location}"
    assert {"encoder.pt", "config.yaml", "metrics.json"} <= {p.name for p in model.iterdir()}
    config = (model / "config.yaml").read_text()
    assert "masking:\n  strategy: cross_crop_prediction" in config and f"dataset: {read_from}\n" in config
    assert run.evaluation["settings"]["dataset"] == read_from
    evaluation = run.artifacts["evaluate/evaluation"]
    assert {"eval.json", "confusion_matrix.png", "report.md"} <= {p.name for p in evaluation.iterdir()}
    assert "linear probe" in run.artifacts["evaluate/report"].read_text().lower()
    if shard_root:
        return  # MLflow and the registry: checked once, on the run below


    client = mlflow.MlflowClient(mlflow_server)
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in runs if r.data.tags.get("hjepa.stage") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    kfp_run_id = parent.data.tags["kfp.run_id"]
    assert kfp_run_id and parent.data.metrics["probe_top1"] == pytest.approx(run.probe_top1)
    parent_id = parent.info.run_id
    children = {r.data.tags["hjepa.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_id}
    assert set(children) == {"shard", "pretrain", "evaluate"}
    for child in children.values():
        assert child.data.tags["kfp.run_id"] == kfp_run_id and child.info.status == "FINISHED"
        assert child.info.run_name == f"{child.data.tags['hjepa.stage']}-{kfp_run_id}"
    assert children["shard"].data.metrics["train_num_samples"] == 96
    pretrain = children["pretrain"]
    assert pretrain.data.params["masking.strategy"] == "cross_crop_prediction"
    assert pretrain.data.params["model.embed_dim"] == "32"
    assert "final_loss" in pretrain.data.metrics or "loss" in pretrain.data.metrics
    evaluation = children["evaluate"]
    versions = client.search_model_versions(f"name='{model_name}'")
    assert [v.run_id for v in versions] == [evaluation.info.run_id]  # registered after evaluation
    assert evaluation.data.metrics["probe_top1"] == pytest.approx(run.probe_top1)
    assert evaluation.data.tags["hjepa.pretrain_run_id"] == pretrain.info.run_id


@pytest.mark.parametrize(("override", "error"), [
    ("training.lr=-1", "training.lr must be a finite number > 0 (e.g. training.lr=1.5e-4), got -1.0"),
    ("source=imagefolder:{missing}", "source 'imagefolder:{missing}': {missing} does not exist; pass the folder"),
])
def test_bad_input_fails_before_the_first_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                override: str, error: str) -> None:
    """A bad config or source: one line, exit 2, in seconds, and no stage runs (no shard is written)."""
    missing = tmp_path / "no-such-folder"
    key, value = override.format(missing=missing).split("=", 1)
    args = ["pipeline", "run-local", "--root", str(tmp_path / "root"), "--config", "configs/fashion_mnist.yaml",
            *([f"--{key}", value] if key == "source" else [f"{key}={value}"])]
    start = time.monotonic()
    assert main(args) == 2
    assert time.monotonic() - start < 60
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("hjepa pipeline: error: " + error.format(missing=missing))
    assert not (tmp_path / "root").exists()


@pytest.mark.slow
def test_failing_stage_ends_the_run_with_its_own_error_line(tmp_path: Path, fashion_mnist_train: object) -> None:
    """A stage that fails on what only it can see (here: 96 shards cannot fill a batch of 128) fails
    the run once (no local retries, which used to take 7 minutes), and the last line is its error."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "hjepa_core.cli", "pipeline", "run-local", "--root", str(tmp_path / "root"),
         "--max-samples", "96", "--max-test-samples", "48", "--probe-epochs", "1", "--no-baselines", *TINY,
         "training.batch_size=128"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("hjepa pipeline run-local: error: pretrain: the training data (data.dataset=shards:")
    assert last.endswith("has 96 samples per rank, fewer than one step needs (training.batch_size=128 x "
                         "training.accumulation_steps=1); lower training.batch_size or use more data")
    assert list((tmp_path / "root").glob("*/shard")) and not list((tmp_path / "root").glob("*/evaluate"))
