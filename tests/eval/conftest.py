"""Eval fixtures: a real (briefly trained) tiny checkpoint, and fast evaluation settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hjepa_core.config import load_config
from hjepa_core.eval import EvalSettings, ProbeSettings
from tests.tiny import tiny_overrides

CONFIG = "configs/fashion_mnist.yaml"


def train_tiny(output_dir: Path, *extra: str):
    """Trains the tiny Fashion-MNIST model for 3 steps; returns the TrainResult."""
    from hjepa_core.eval.knn_monitor import epoch_monitor
    from hjepa_core.train import train

    cfg = load_config(CONFIG, tiny_overrides(output_dir, "training.max_steps=3", *extra))
    return train(cfg, progress=False, monitor=epoch_monitor(cfg))


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, fashion_mnist_train) -> Path:
    """``encoder.pt`` of a 3-step tiny run (embed 32, depth 2, 32 px crops, 4 px patches)."""
    return train_tiny(tmp_path_factory.mktemp("tiny_run")).encoder_path


def fast_settings(tmp_path: Path, **overrides) -> EvalSettings:
    """Small subsets and a short probe, so one evaluation takes seconds."""
    values = dict(max_train_samples=300, max_test_samples=100, probe=ProbeSettings(epochs=5),
                  cache_dir=str(tmp_path / "cache"), output_dir=str(tmp_path / "eval"), progress=False,
                  tracking=False, batch_size=128)
    values.update(overrides)
    return EvalSettings(**values)


@pytest.fixture
def separable() -> tuple[torch.Tensor, ...]:
    """10 well-separated Gaussian classes in 32 dims: train (1000) and test (300)."""
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(10, 32, generator=g) * 4
    y_train = torch.arange(1000) % 10
    y_test = torch.arange(300) % 10
    x_train = centres[y_train] + torch.randn(1000, 32, generator=g)
    x_test = centres[y_test] + torch.randn(300, 32, generator=g)
    return x_train, y_train, x_test, y_test
