"""The training engine end to end on the embedded dataset (tiny model, CPU)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hjepa_core.cli import main as cli_main
from hjepa_core.config import ConfigError, load_config
from hjepa_core.tracking import TrackingUnavailableError
from hjepa_core.train import train
from hjepa_core.train.engine import Trainer
from tests.tiny import tiny_overrides

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _cli(*args: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "hjepa_core.cli", *args], cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def test_loss_is_finite_and_falls(tmp_path):
    cfg = load_config("configs/fashion_mnist.yaml",
                      tiny_overrides(tmp_path, "training.max_steps=24", "training.warmup_epochs=0"))
    result = train(cfg, progress=False)
    losses = [h["loss"] for h in result.metrics["history"] if "loss" in h]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert result.metrics["epochs_completed"] == 1  # 256 samples / batch 16 = 16 steps per epoch
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses
    for name in ("encoder.pt", "metrics.json", "config.yaml", "loss_curve.png", "crops_and_masks.png"):
        assert (tmp_path / name).is_file(), name
    saved = torch.load(tmp_path / "encoder.pt", weights_only=True)
    assert saved["arch"]["embed_dim"] == 32 and saved["config"]["training"]["max_steps"] == 24
    assert any(k.startswith("collapse/") for h in result.metrics["history"] for k in h)


def _final_weights(directory: Path) -> dict:
    return torch.load(directory / "encoder.pt", weights_only=True)["state_dict"]


def test_sigterm_then_resume_equals_uninterrupted(tmp_path):
    steps = ["training.max_steps=40", "training.checkpoint_every_steps=2", "training.accumulation_steps=2",
             "data.max_samples=512", "training.batch_size=8"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    args = ["train", "--config", "configs/fashion_mnist.yaml", "--no-progress"]
    run = _cli(*args, *tiny_overrides(straight, *steps))
    killed = _cli(*args, *tiny_overrides(resumed, *steps))
    deadline = time.time() + 120
    while not list((resumed / "checkpoints").glob("checkpoint-*.pt")) and time.time() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGTERM)
    out, _ = killed.communicate(timeout=120)
    assert killed.returncode == 143, out
    assert not (resumed / "encoder.pt").exists()
    metrics = json.loads((resumed / "metrics.json").read_text())
    assert metrics["preempted"] and 0 < metrics["steps"] < 40
    again = _cli(*args, *tiny_overrides(resumed, *steps), "--resume")
    assert again.wait(timeout=300) == 0, again.stdout.read()
    assert run.wait(timeout=300) == 0, run.stdout.read()
    a, b = _final_weights(straight), _final_weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_torchrun_ddp_keeps_ranks_identical(tmp_path):
    out = tmp_path / "ddp.json"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
         str(ROOT / "tests" / "train" / "ddp_check.py"), str(out), str(tmp_path / "run")],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    # The kNN monitor runs on both ranks, each embedding half of its 300 + 100 images; rank 0 logs.
    assert result == {"world_size": 2, "steps": 3, "online": True, "ema": True, "predictor": True,
                      "ema_differs_from_online": True, "monitor_calls_per_rank": [1, 1],
                      "monitor_same_on_every_rank": True, "monitor_images_per_rank": [200, 200],
                      "monitor_logged": [3]}


def test_unreachable_mlflow_fails_before_training(tmp_path, capsys):
    code = cli_main(["train", "--config", "configs/fashion_mnist.yaml",
                     *tiny_overrides(tmp_path), "tracking.enabled=true",
                     "tracking.tracking_uri=http://127.0.0.1:9"])
    assert code == 2
    assert "unreachable" in capsys.readouterr().err
    assert not (tmp_path / "config.yaml").exists()
    cfg = load_config("configs/fashion_mnist.yaml",
                      tiny_overrides(tmp_path, "tracking.enabled=true", "tracking.tracking_uri=http://127.0.0.1:9"))
    with pytest.raises(TrackingUnavailableError, match=r"tracking\.enabled=false"):
        train(cfg, progress=False)


def test_cli_reports_bad_config(tmp_path, capsys):
    code = cli_main(["train", "--config", "configs/fashion_mnist.yaml", "training.bach_size=4"])
    assert code == 2
    assert "did you mean 'training.batch_size'" in capsys.readouterr().err


def test_missing_data_path_fails_before_any_work(tmp_path):
    cfg = load_config("configs/fashion_mnist.yaml", tiny_overrides(tmp_path / "run", "data.data_path=/nonexistent"))
    with pytest.raises(ConfigError, match=r"data\.data_path=/nonexistent does not exist"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()


def test_seed_command_starts_on_cpu(tmp_path):
    proc = subprocess.run(
        [sys.executable, "scripts/train.py", "--config", "configs/multicrop_training.yaml",
         "--batch_size", "2", "--epochs", "1", "--lr", "1e-4", "--no-progress",
         "data.dataset=fashion_mnist", "data.data_path=null", "data.max_samples=8", "data.num_workers=0",
         "training.max_steps=1", "tracking.enabled=false", f"training.output_dir={tmp_path}"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "trained 1 steps" in proc.stdout
    saved = torch.load(tmp_path / "encoder.pt", weights_only=True)
    assert saved["arch"]["embed_dim"] == 768 and saved["config"]["training"]["lr"] == pytest.approx(1e-4)


def test_trains_from_shards(tmp_path):
    shards = tmp_path / "shards"
    assert cli_main(["shard", "--source", "fashion_mnist", "--out", str(shards), "--max-samples", "256",
                     "--samples-per-shard", "64", "--no-progress"]) == 0
    cfg = load_config("configs/fashion_mnist.yaml",
                      tiny_overrides(tmp_path / "run", f"data.dataset=shards:{shards}", "training.max_steps=6",
                                     "data.num_workers=2"))
    result = train(cfg, progress=False)
    assert result.metrics["epochs_completed"] == 0
    assert result.steps == 6 and (tmp_path / "run" / "encoder.pt").is_file()
    # training.seed reaches the shard stream: another seed streams other samples first.
    first = {}
    for seed in (0, 1):
        seeded = load_config("configs/fashion_mnist.yaml", tiny_overrides(
            tmp_path / f"seed{seed}", f"data.dataset=shards:{shards}", f"training.seed={seed}", "data.num_workers=0"))
        first[seed] = next(iter(Trainer(seeded, progress=False).loader)).indices.tolist()
    assert first[0] != first[1]


def test_null_num_workers_loads_in_the_training_process_on_cpu(tmp_path):
    cfg = load_config("configs/fashion_mnist.yaml", tiny_overrides(tmp_path / "run", "data.num_workers=null"))
    assert Trainer(cfg, progress=False).loader.num_workers == 0


def test_time_budget_ends_on_the_clock_and_finishes_the_cosine(tmp_path):
    cfg = load_config("configs/fashion_mnist.yaml",
                      tiny_overrides(tmp_path, "training.time_budget_s=4", "training.epochs=1", "data.max_samples=16",
                                     "training.log_every=1", "training.warmup_epochs=0.25", "training.min_lr=1e-6"))
    result = train(cfg, progress=False)
    summary = result.metrics
    # The clock ends the run, within one step (generous: a loaded 2-core machine can take seconds per step).
    assert 4.0 <= summary["train_seconds"] < 4.0 + 30.0, summary["train_seconds"]
    # Not the epoch count (1): a 16-image epoch is 1 step, and the run went on past it.
    assert summary["epochs_completed"] >= 2 and result.steps >= 2
    assert summary["images_seen"] == result.steps * 16
    assert max(h["lr"] for h in summary["history"] if "lr" in h) <= cfg.training.lr


def test_schedules_follow_the_fraction_of_the_budget_spent():
    from types import SimpleNamespace

    from hjepa_core.train.engine import Trainer

    cfg = load_config("configs/fashion_mnist.yaml", ["training.time_budget_s=100", "training.warmup_epochs=0.2",
                                                     "training.epochs=1", "training.min_lr=1e-6"])

    def schedules_at(seconds: float) -> dict[str, float]:
        trainer = SimpleNamespace(config=cfg, time_budget=100.0, train_seconds=seconds, warmup_fraction=0.2)
        trainer._progress = lambda: Trainer._progress(trainer)
        return Trainer._schedules(trainer)

    assert schedules_at(0.0)["lr"] == 0.0
    assert schedules_at(20.0)["lr"] == pytest.approx(cfg.training.lr)  # warmup is 20% of the budget
    end = schedules_at(100.0)
    assert end["lr"] == pytest.approx(1e-6) and end["ema_momentum"] == pytest.approx(cfg.training.ema_momentum_end)


def test_outputs_are_readable_by_the_next_stage_under_a_strict_umask(tmp_path):
    """Shards and training outputs are 0644 in 0755 folders even under umask 077, so a pipeline
    stage running as another user (a KFP pod on a shared volume) can read them."""
    previous = os.umask(0o077)
    try:
        shards, run = tmp_path / "shards", tmp_path / "run"
        assert cli_main(["shard", "--source", "fashion_mnist", "--out", str(shards), "--max-samples", "64",
                         "--no-progress"]) == 0
        train(load_config("configs/fashion_mnist.yaml",
                          tiny_overrides(run, f"data.dataset=shards:{shards}", "training.max_steps=2")),
              progress=False)
    finally:
        os.umask(previous)
    modes = {p.relative_to(tmp_path).as_posix(): p.stat().st_mode & 0o777 for p in tmp_path.rglob("*")}
    assert {"run/encoder.pt", "run/config.yaml", "run/checkpoints", "shards/manifest.json",
            "shards/train-000000.tar"} <= set(modes)
    wrong = {name: oct(mode) for name, mode in modes.items()
             if mode != (0o755 if (tmp_path / name).is_dir() else 0o644)}
    assert not wrong
