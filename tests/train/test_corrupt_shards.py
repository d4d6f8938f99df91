"""Training on damaged shards: corrupt samples and shards are skipped, counted and reported
(log, metrics.json, MLflow), and the policy (data.on_corrupt, data.max_corrupt_fraction) fails a
run that loses too much, in one line naming the shards."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hjepa_core.cli import main as cli_main
from hjepa_core.config import load_config
from hjepa_core.train import train
from tests.damage import KINDS, damage_shard
from tests.tiny import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
LOST = 1 + 44 + 24 + 64  # of 256: sample 5 of shard 0, 20.. of shard 1, 40.. of shard 2, all of shard 3


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, fashion_mnist_train):
    """256 Fashion-MNIST images in 4 shards of 64, each damaged one way (see tests/damage.py)."""
    shards = tmp_path_factory.mktemp("damaged_shards")
    assert cli_main(["shard", "--source", "fashion_mnist", "--out", str(shards), "--max-samples", "256",
                     "--samples-per-shard", "64", "--no-progress"]) == 0
    lost = [damage_shard(shards / f"train-{i:06d}.tar", kind, at) for i, (kind, at) in
            enumerate(zip(KINDS, (5, 20, 40, 0), strict=True))]
    assert sum(lost) == LOST
    return shards


# Training draws shards at random (with replacement); two epochs (32 steps) of this stream draw all four.
DRAWS_ALL = ["data.num_workers=2", "training.epochs=2"]


def _config(shards, out, *extra):
    return load_config("configs/fashion_mnist.yaml",
                       tiny_overrides(out, f"data.dataset=shards:{shards}", *DRAWS_ALL, *extra))


def test_training_skips_counts_and_reports_corrupt_shards(damaged, tmp_path, mlflow_server):
    import mlflow

    cfg = _config(damaged, tmp_path, "data.max_corrupt_fraction=0.6", "tracking.enabled=true",
                  f"tracking.tracking_uri={mlflow_server}", "tracking.experiment=corrupt-shards",
                  "tracking.registered_model_name=null")
    with pytest.warns(UserWarning, match=rf"^training data: 4 corrupt shard\(s\) {damaged}/train-000000.tar "
                                         rf"\(samples fail their checksum\), {damaged}/train-000001.tar .* and 1 more: "
                                         rf"{LOST} of 256 samples \(52\.0%\) lost; skipped \(data\.on_corrupt=skip"):
        result = train(cfg, progress=False)
    assert result.steps == 32 and (tmp_path / "encoder.pt").is_file()
    integrity = json.loads((tmp_path / "metrics.json").read_text())["data_integrity"]
    assert integrity["lost_samples"] == LOST and integrity["samples"] == 256
    assert [s["reason"] for s in integrity["corrupt_shards"]] == [
        "samples fail their checksum", "fewer samples than the manifest lists", "tar read error", "tar read error"]
    assert [s["lost"] for s in integrity["corrupt_shards"]] == [1, 44, 24, 64]
    run = mlflow.MlflowClient(mlflow_server).get_run(result.run_id)
    assert run.data.metrics["data/lost_samples"] == LOST and run.data.metrics["data/corrupt_shards"] == 4


@pytest.mark.parametrize("setting", ["data.max_corrupt_fraction=0.01", "data.on_corrupt=fail"])
def test_policy_fails_the_run_in_one_line(damaged, tmp_path, setting):
    overrides = [f"data.dataset=shards:{damaged}", *DRAWS_ALL, setting]
    proc = subprocess.run([sys.executable, "-m", "hjepa_core.cli", "train", "--config", "configs/fashion_mnist.yaml",
                           "--no-progress", *tiny_overrides(tmp_path, *overrides)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    rule = "data.on_corrupt=fail" if "fail" in setting else "more than data.max_corrupt_fraction=0.01"
    assert err[-1].startswith("hjepa train: error: training data: ") and "corrupt shard(s)" in err[-1]
    assert f"{damaged}/train-0000" in err[-1] and f"{rule}; re-run `hjepa shard`" in err[-1]
    # Before it, the loader's line for each corrupt shard it read, e.g.
    # ".../train-000003.tar: tar read error (ReadError: empty file); 64 of 64 samples lost, skipped".
    assert re.search(rf"{damaged}/train-00000\d\.tar: [a-z ]+.*; \d+ of 64 samples lost, skipped", proc.stderr)
    assert not (tmp_path / "encoder.pt").exists()
