"""The stages: shards written to an object store, pretrain under torchrun and a retry resuming
from the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hjepa_core.data.shards import ShardSource, write_shards
from hjepa_core.pipeline import StageTracking, pretrain_stage, read_stage, shard_stage
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


def test_shard_stage_uploads_to_an_object_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fashion_mnist_train: object
) -> None:
    """A URL destination: shards written locally, uploaded (manifest last), read back from the URL;
    the stage's record (stage.json) says where they are and holds no shard."""
    import fsspec

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    url, record = "memory://hjepa-stage-test/run-1", tmp_path / "record"
    manifest = shard_stage("fashion_mnist", url, record, StageTracking(kfp_run_id="test"), max_samples=40,
                           max_test_samples=20, samples_per_shard=16)
    memory = fsspec.filesystem("memory")
    names = {Path(p).name for p in memory.ls("/hjepa-stage-test/run-1", detail=False)}
    shards = {s["name"] for info in manifest["splits"].values() for s in info["shards"]}
    assert len(shards) == 5 and names == shards | {"manifest.json"}
    remote = ShardSource(f"{url}/manifest.json", "test")  # what the pipeline's stages read
    assert len(remote) == 20 and len(list(remote)) == 20
    assert read_stage(record)["location"] == url and {p.name for p in record.iterdir()} == {"stage.json"}
