"""The pretrain stage: torchrun for several devices, and a retry resuming from the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hjepa_core.data.shards import write_shards
from hjepa_core.pipeline import StageTracking, pretrain_stage, read_stage
from tests.tiny import TINY_OVERRIDES

ROOT = Path(__file__).resolve().parents[2]
TINY = [o for o in TINY_OVERRIDES if not o.startswith(("data.max_samples", "tracking."))]


@pytest.mark.slow
def test_pretrain_stage_torchrun_then_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fashion_mnist_train: object
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shards = tmp_path / "shards"
    write_shards("fashion_mnist", shards, "train", max_samples=64, progress=False)
    work, off = tmp_path / "work", StageTracking(kfp_run_id="test")
    config = str(ROOT / "configs" / "fashion_mnist.yaml")
    info = pretrain_stage(config, [*TINY, "training.max_steps=2"], shards, work, tmp_path / "model", off, gpus=2)
    assert info["steps"] == 2 and info["mlflow_run_id"] is None
    assert (tmp_path / "model" / "encoder.pt").is_file() and read_stage(tmp_path / "model")["steps"] == 2
    assert list((work / "checkpoints").glob("*.pt")), "torchrun's run left no checkpoint to resume from"
    first = json.loads((work / "metrics.json").read_text())["history"]
    assert first
    # A retry of the step (same work dir) resumes from that checkpoint instead of starting over:
    # the restored history keeps the 2-rank run's exact losses.
    again = pretrain_stage(config, [*TINY, "training.max_steps=3"], shards, work, tmp_path / "model2", off)
    assert again["steps"] == 3
    assert json.loads((work / "metrics.json").read_text())["history"][: len(first)] == first
