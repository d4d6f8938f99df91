"""A training run's MLflow contents, and tracking that never blocks training (a server that dies
mid-run; runs that end FAILED or KILLED), against real local MLflow servers."""

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient

from hjepa_core.config import ConfigError, load_config
from hjepa_core.train import train
from hjepa_core.train.checkpoint import CheckpointError
from tests.conftest import start_mlflow_server, stop_mlflow_server
from tests.tiny import tiny_overrides


def test_training_run_is_browsable_in_mlflow(tmp_path, mlflow_server):
    cfg = load_config("configs/fashion_mnist.yaml", tiny_overrides(
        tmp_path, "training.max_steps=4", "tracking.enabled=true", f"tracking.tracking_uri={mlflow_server}",
        "tracking.experiment=engine-test", "tracking.registered_model_name=hjepa-encoder-test",
        "loss.collapse_every=2"))
    result = train(cfg, progress=False)
    client = MlflowClient(tracking_uri=mlflow_server)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["training.lr"] == str(cfg.training.lr)
    assert params["masking.strategy"] == "global_only"
    assert params["data.multicrop.num_local_crops"] == str(cfg.data.multicrop.num_local_crops)
    assert len(params) == len(cfg.flat())
    for key in ("loss", "loss/level_0", "loss/level_1", "loss/local", "lr", "weight_decay",
                "ema_momentum", "images_per_s", "collapse/std", "collapse/effective_rank", "grad_norm"):
        assert key in run.data.metrics, key
    assert len(client.get_metric_history(result.run_id, "loss")) == 2  # log_every=2 over 4 steps
    artifacts = {a.path for a in client.list_artifacts(result.run_id)}
    assert {"config.yaml", "metrics.json", "loss_curve.png", "crops_and_masks.png", "encoder.pt"} <= artifacts
    # the final training state is an artifact; the encoder is registered only after evaluation
    checkpoints = [a.path for a in client.list_artifacts(result.run_id, "checkpoints")]
    assert checkpoints == ["checkpoints/checkpoint-00000004.pt"]
    assert client.search_model_versions("name='hjepa-encoder-test'") == []


ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
LONG_RUN = ["training.epochs=3", "training.max_steps=40", "training.checkpoint_every_steps=2",
            "training.keep_last_checkpoints=50", "--no-progress"]  # 16 steps per epoch of 256 images


def _train_cli(out: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "hjepa_core.cli", "train", "--config", "configs/fashion_mnist.yaml",
         *tiny_overrides(out, *overrides)], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def _runs(uri: str, experiment: str) -> list:
    client = MlflowClient(tracking_uri=uri)
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id]) if found else []


def test_training_outlives_its_mlflow_server(tmp_path, fashion_mnist_train):
    """The server dies mid-run: training warns once, finishes its steps, and writes its checkpoints
    and encoder within a bounded time (MLflow's own retries would stall each call for minutes)."""
    (tmp_path / "server").mkdir()
    uri, server = start_mlflow_server(tmp_path / "server")
    try:
        run = _train_cli(tmp_path / "run", *LONG_RUN, "tracking.enabled=true", f"tracking.tracking_uri={uri}",
                         "tracking.experiment=dies-mid-run", "tracking.timeout_s=3")
        _wait_for(tmp_path / "run" / "checkpoints" / "checkpoint-00000002.pt", run)
        stop_mlflow_server(server, signal.SIGKILL)
        killed_at = time.monotonic()
        out, _ = run.communicate(timeout=180)
        after_kill = time.monotonic() - killed_at
    finally:
        stop_mlflow_server(server, signal.SIGKILL)
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, out[-3000:]
    assert "trained 40 steps" in out and (tmp_path / "run" / "encoder.pt").is_file()
    assert len(list((tmp_path / "run" / "checkpoints").glob("checkpoint-*.pt"))) == 20
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == 40
    assert re.search(r"MLflow \w+ failed \((no answer in 3 s|\w+Error: .*)\); the run goes on and skips MLflow "
                     rf"calls until {re.escape(uri)} answers again", out), out[-3000:]
    assert after_kill < 120, after_kill  # one 3 s timeout, then calls are skipped (a loaded machine: slack)


def test_run_ends_failed_when_training_raises(tmp_path, mlflow_server):
    def broken_monitor(encoder, device):
        raise RuntimeError("monitor broke")

    experiment = f"raises-{uuid.uuid4().hex[:8]}"
    tracking = ["tracking.enabled=true", f"tracking.tracking_uri={mlflow_server}", f"tracking.experiment={experiment}",
                "data.max_samples=32", "data.knn_monitor_every=1"]
    cfg = load_config("configs/fashion_mnist.yaml", tiny_overrides(tmp_path / "a", *tracking))
    with pytest.raises(RuntimeError, match="monitor broke"):
        train(cfg, progress=False, monitor=broken_monitor)
    assert [r.info.status for r in _runs(mlflow_server, experiment)] == ["FAILED"]
    # A failure after the run started but before training (a resume file that does not load) ends it FAILED too.
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"")
    cfg = load_config("configs/fashion_mnist.yaml", tiny_overrides(tmp_path / "b", *tracking))
    with pytest.raises(CheckpointError):
        train(cfg, resume=str(bad), progress=False)
    assert [r.info.status for r in _runs(mlflow_server, experiment)] == ["FAILED", "FAILED"]
    # Data that cannot fill a step is a config error before any run starts.
    cfg = load_config("configs/fashion_mnist.yaml", tiny_overrides(tmp_path / "c", *tracking, "data.max_samples=8"))
    with pytest.raises(ConfigError, match=r"has 8 samples per rank, fewer than one step needs \(training.batch_size="
                                          r"16 x training.accumulation_steps=1\); lower training.batch_size"):
        train(cfg, progress=False)
    assert len(_runs(mlflow_server, experiment)) == 2


def test_run_ends_killed_when_preempted(tmp_path, mlflow_server):
    experiment = f"sigterm-{uuid.uuid4().hex[:8]}"
    run = _train_cli(tmp_path, *LONG_RUN, "tracking.enabled=true", f"tracking.tracking_uri={mlflow_server}",
                     f"tracking.experiment={experiment}")
    _wait_for(tmp_path / "checkpoints" / "checkpoint-00000002.pt", run)
    run.send_signal(signal.SIGTERM)
    out, _ = run.communicate(timeout=180)
    assert run.returncode == 143, out[-3000:]
    assert [r.info.status for r in _runs(mlflow_server, experiment)] == ["KILLED"]
