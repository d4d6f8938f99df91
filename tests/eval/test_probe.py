import pytest
import torch

from hjepa_core.eval.probe import ProbeSettings, linear_probe

FAST = ProbeSettings(epochs=10)


def test_linearly_separable_features_give_near_perfect_accuracy(separable):
    x_train, y_train, x_test, y_test = separable
    result = linear_probe(x_train, y_train, x_test, y_test, 10, FAST)
    assert result.metrics["top1"] >= 0.99
    assert result.metrics["top5"] == 1.0
    assert len(result.sweep) == len(FAST.lrs) * len(FAST.weight_decays)
    assert (result.lr, result.weight_decay) in {(s["lr"], s["weight_decay"]) for s in result.sweep}
    assert min(result.metrics["per_class"]) >= 0.95
    confusion = torch.tensor(result.metrics["confusion"])
    assert confusion.sum() == len(y_test) and confusion.diag().sum() >= 0.99 * len(y_test)


def test_random_labels_give_chance_accuracy():
    g = torch.Generator().manual_seed(1)
    x_train, x_test = torch.randn(2000, 32, generator=g), torch.randn(2000, 32, generator=g)
    y_train, y_test = torch.randint(0, 4, (2000,), generator=g), torch.randint(0, 4, (2000,), generator=g)
    result = linear_probe(x_train, y_train, x_test, y_test, 4, FAST)
    assert abs(result.metrics["top1"] - 0.25) < 0.05
    assert "top5" not in result.metrics  # only with more than 5 classes


def test_feature_scale_does_not_matter(separable):
    """Standardisation: features scaled by 1e4 and shifted give the same answer."""
    x_train, y_train, x_test, y_test = separable
    a = linear_probe(x_train, y_train, x_test, y_test, 10, FAST)
    b = linear_probe(x_train * 1e4 + 7, y_train, x_test * 1e4 + 7, y_test, 10, FAST)
    assert abs(a.metrics["top1"] - b.metrics["top1"]) <= 0.01


def test_bad_settings_are_rejected(separable):
    x_train, y_train, x_test, y_test = separable
    with pytest.raises(ValueError, match="val_fraction"):
        linear_probe(x_train, y_train, x_test, y_test, 10, ProbeSettings(val_fraction=1.5))
    with pytest.raises(ValueError, match="lrs"):
        linear_probe(x_train, y_train, x_test, y_test, 10, ProbeSettings(lrs=()))
