"""Evaluating on damaged shards: the loss is never silent. Within the policy the report says how
many samples were lost and where (eval.json, report.md, metrics, MLflow, the log); beyond it the
evaluation fails in one line naming the shards."""

import json
import subprocess
import sys

import pytest

from hjepa_core.cli import main as cli_main
from hjepa_core.eval import evaluate
from tests.damage import KINDS, damage_shard
from tests.eval.conftest import fast_settings

LOST = 1 + 51 + 24 + 64  # of the 256 test images: one per kind of damage (see tests/damage.py)


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, fashion_mnist_train):
    """Fashion-MNIST shards: train 256 intact, test 256 in 4 shards of 64, each damaged one way."""
    shards = tmp_path_factory.mktemp("damaged_eval_shards")
    for split in ("train", "test"):
        assert cli_main(["shard", "--source", "fashion_mnist", "--out", str(shards), "--split", split,
                         "--max-samples", "256", "--samples-per-shard", "64", "--no-progress"]) == 0
    lost = [damage_shard(shards / f"test-{i:06d}.tar", kind, at) for i, (kind, at) in
            enumerate(zip(KINDS, (5, 13, 40, 0), strict=True))]
    assert sum(lost) == LOST
    return shards


def test_evaluate_reports_what_it_lost(damaged, tiny_checkpoint, tmp_path, mlflow_server):
    import mlflow

    settings = fast_settings(tmp_path, dataset=f"shards:{damaged}", max_train_samples=None, max_test_samples=None,
                             baselines=False, num_workers=2, max_corrupt_fraction=0.6, tracking=True,
                             tracking_uri=mlflow_server, experiment="corrupt-eval")
    with pytest.warns(UserWarning, match=rf"^test data: 4 corrupt shard\(s\) {damaged}/test-000000.tar \(samples "
                                         rf"fail their checksum\), {damaged}/test-000001.tar .* and 1 more: {LOST} of "
                                         r"256 samples \(54\.7%\) lost; evaluated without them \(on_corrupt=skip"):
        report = evaluate(tiny_checkpoint, settings)
    assert report["num_test"] == 256 - LOST and report["num_train"] == 256
    loss = report["data_integrity"]["test"]
    assert loss["lost_samples"] == LOST and [s["lost"] for s in loss["corrupt_shards"]] == [1, 51, 24, 64]
    assert report["data_integrity"]["train"]["lost_samples"] == 0
    stored = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert stored["data_integrity"] == report["data_integrity"] and stored["num_test"] == 256 - LOST
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["data/test_lost_samples"] == LOST
    assert "test data: 4 corrupt shard(s)" in (tmp_path / "eval" / "report.md").read_text()
    run = mlflow.MlflowClient(mlflow_server).get_run(report["mlflow_run_id"])
    assert run.data.metrics["data/test_lost_samples"] == LOST and run.data.metrics["data/train_lost_samples"] == 0
    cached = {p.name.split("-")[1] for p in (tmp_path / "cache").glob("*.pt")}
    assert cached == {"train"}  # features of a damaged split are not cached: the next run reports it again


@pytest.mark.parametrize("flag", ["--max_corrupt_fraction=0.01", "--on_corrupt=fail"])
def test_evaluate_fails_beyond_the_policy_in_one_line(damaged, tiny_checkpoint, tmp_path, capsys, flag):
    code = cli_main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--dataset", f"shards:{damaged}",
                     "--no-baselines", "--probe_epochs", "1", "--no-tracking", "--no-cache", "--no-progress",
                     "--output_dir", str(tmp_path / "eval"), flag])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    rule = "data.on_corrupt=fail" if "fail" in flag else "more than data.max_corrupt_fraction=0.01"
    assert err[-1].startswith(f"hjepa evaluate: error: test data: 4 corrupt shard(s) {damaged}/test-000000.tar")
    assert f"{LOST} of 256 samples (54.7%) lost, {rule}; re-run `hjepa shard`" in err[-1]
    assert not (tmp_path / "eval" / "eval.json").exists()


def test_evaluate_warns_in_one_line_per_loss(damaged, tiny_checkpoint, tmp_path):
    """Within the policy the CLI's warning is one line, as its errors are (a real process: pytest
    records warnings in-process instead of printing them)."""
    result = subprocess.run(
        [sys.executable, "-m", "hjepa_core.cli", "evaluate", "--checkpoint", str(tiny_checkpoint),
         "--dataset", f"shards:{damaged}", "--no-baselines", "--probe_epochs", "1", "--no-tracking", "--no-cache",
         "--no-progress", "--max_train_samples", "64", "--output_dir", str(tmp_path / "eval"),
         "--max_corrupt_fraction", "0.6"],
        capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    warned = [line for line in result.stderr.splitlines() if "corrupt shard(s)" in line]
    assert warned and all(line.startswith("hjepa evaluate: warning: test data: ") for line in warned)
    assert "yield from" not in result.stderr and "UserWarning" not in result.stderr
