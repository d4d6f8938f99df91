import json

import torch

from hjepa_core.config import load_config
from hjepa_core.eval import knn_monitor
from hjepa_core.eval.knn_monitor import KnnMonitor
from hjepa_core.models.vit import VisionTransformer
from tests.eval.conftest import CONFIG, train_tiny
from tests.tiny import tiny_overrides


def test_monitor_scores_a_fixed_subset_and_sees_collapse(tmp_path, fashion_mnist_train):
    cfg = load_config(CONFIG, tiny_overrides(tmp_path))
    monitor = KnnMonitor(cfg, "cpu", train_samples=300, test_samples=100)
    assert monitor.train_pixels.shape == (300, 3, 32, 32) and monitor.num_classes == 10
    torch.manual_seed(0)
    encoder = VisionTransformer(patch_size=4, embed_dim=32, depth=2, num_heads=2).train()
    first = monitor.run(encoder)
    assert encoder.training  # the encoder's mode is restored
    # even random weights beat chance (0.1) on Fashion-MNIST; a collapsed encoder does not
    assert set(first) == {"knn_monitor/top1", "knn_monitor/top5"} and first["knn_monitor/top1"] > 0.25
    assert monitor.run(encoder) == first  # same subset, same answer
    with torch.no_grad():  # a collapsed encoder: every image maps to the same feature
        encoder.norm.weight.zero_()
        encoder.norm.bias.fill_(1.0)
    assert monitor.run(encoder)["knn_monitor/top1"] < 0.2


def test_engine_logs_the_monitor_every_epoch_and_at_the_end(tmp_path, fashion_mnist_train, monkeypatch):
    monkeypatch.setattr(knn_monitor, "DEFAULT_TRAIN_SAMPLES", 300)
    monkeypatch.setattr(knn_monitor, "DEFAULT_TEST_SAMPLES", 100)
    # 32 samples / batch 16 = 2 steps per epoch; 2 epochs; monitor every epoch and at the end (deduplicated)
    result = train_tiny(tmp_path, "data.max_samples=32", "training.epochs=2", "training.max_steps=null",
                        "data.knn_monitor_every=1")
    history = json.loads((tmp_path / "metrics.json").read_text())["history"]
    steps = [h["step"] for h in history if "knn_monitor/top1" in h]
    assert steps == [2, 4], steps
    assert result.steps == 4
