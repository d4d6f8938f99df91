"""Linear probe on frozen, cached features.

The usual recipe of self-supervised evaluation (I-JEPA, Assran et al., 2023; MAE, He et al.,
2022, which puts a parameter-free BatchNorm before the linear layer): features standardised
with the training set's mean and std, a linear softmax classifier trained with SGD + momentum
and a cosine learning-rate schedule, learning rate and weight decay chosen on a held-out part of
the training split, then refit on the whole training split and reported once on the test split.

Every (lr, weight decay) pair of the sweep is trained at the same time, as one batched model
fed the same mini-batches (gradients of softmax cross-entropy written out by hand), so the sweep
costs about one training run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from hjepa_core.eval.metrics import classification_metrics

DEFAULT_LRS: tuple[float, ...] = (0.01, 0.1, 1.0)
DEFAULT_WEIGHT_DECAYS: tuple[float, ...] = (0.0, 1e-5, 1e-4, 1e-3)


@dataclass
class ProbeSettings:
    """Linear-probe hyper-parameters (the sweep is the product of ``lrs`` and ``weight_decays``)."""

    lrs: tuple[float, ...] = DEFAULT_LRS
    weight_decays: tuple[float, ...] = DEFAULT_WEIGHT_DECAYS
    epochs: int = 30
    batch_size: int = 256
    momentum: float = 0.9
    val_fraction: float = 0.1
    seed: int = 0

    def validate(self) -> ProbeSettings:
        if not self.lrs or not self.weight_decays or min(self.lrs) <= 0 or min(self.weight_decays) < 0:
            raise ValueError("probe lrs must be > 0 and weight decays >= 0 (at least one of each)")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"probe epochs and batch_size must be >= 1, got {self.epochs}, {self.batch_size}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"probe val_fraction must be in (0, 1), got {self.val_fraction}")
        return self


@dataclass
class ProbeResult:
    """Test metrics of the refit probe, the chosen hyper-parameters and the whole sweep."""

    metrics: dict[str, Any]
    lr: float
    weight_decay: float
    sweep: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**self.metrics, "lr": self.lr, "weight_decay": self.weight_decay, "sweep": self.sweep}


def standardize(train: Tensor, *others: Tensor) -> list[Tensor]:
    """Centres and scales every tensor with ``train``'s per-dimension mean and std."""
    mean = train.mean(dim=0)
    std = train.std(dim=0).clamp_min(1e-6)
    return [(t - mean) / std for t in (train, *others)]


def _fit(
    x: Tensor, y: Tensor, num_classes: int, lrs: Tensor, weight_decays: Tensor, settings: ProbeSettings,
) -> tuple[Tensor, Tensor]:
    """Trains S linear classifiers at once; returns weights (D, S, C) and biases (S, C).

    The S classifiers share one (D, S*C) matrix, so each step is two plain matrix products.
    """
    n, d = x.shape
    s, c = len(lrs), num_classes
    weight = x.new_zeros(d, s, c)
    bias = x.new_zeros(s, c)
    velocity_w, velocity_b = torch.zeros_like(weight), torch.zeros_like(bias)
    lrs, weight_decays = lrs.to(x), weight_decays.to(x)
    generator = torch.Generator().manual_seed(settings.seed)
    total = settings.epochs * math.ceil(n / settings.batch_size)
    step = 0
    for _ in range(settings.epochs):
        order = torch.randperm(n, generator=generator).to(x.device)
        for start in range(0, n, settings.batch_size):
            idx = order[start:start + settings.batch_size]
            xb, yb = x[idx], y[idx]
            grad = (xb @ weight.view(d, s * c)).view(-1, s, c).add_(bias).softmax(dim=-1)
            grad[torch.arange(len(yb), device=x.device), :, yb] -= 1.0
            grad /= len(yb)
            grad_w = (xb.T @ grad.view(-1, s * c)).view(d, s, c).add_(weight * weight_decays[:, None])
            lr = lrs * (0.5 * (1.0 + math.cos(math.pi * step / total)))
            velocity_w.mul_(settings.momentum).add_(grad_w)
            velocity_b.mul_(settings.momentum).add_(grad.sum(dim=0))
            weight -= lr[:, None] * velocity_w
            bias -= lr[:, None] * velocity_b
            step += 1
    return weight, bias


def _scores(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """(N, D) features -> (S, N, C) scores of every classifier."""
    d, s, c = weight.shape
    return ((x @ weight.view(d, s * c)).view(-1, s, c) + bias).transpose(0, 1)


@torch.no_grad()
def linear_probe(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    settings: ProbeSettings | None = None,
) -> ProbeResult:
    """Sweeps (lr, weight decay) on a held-out part of train, refits on all of train, tests once.

    Args:
        train_features, test_features: (N, D) frozen features.
        train_labels, test_labels: (N,) integer classes in ``[0, num_classes)``.
        num_classes: C.
        settings: the recipe; :class:`ProbeSettings` defaults when None.
    """
    settings = (settings or ProbeSettings()).validate()
    if len(train_features) < 2:
        raise ValueError("the linear probe needs at least 2 training samples")
    x_all = train_features.float()
    y_all = train_labels.long().to(x_all.device)
    grid = [(lr, wd) for lr in settings.lrs for wd in settings.weight_decays]
    lrs = torch.tensor([g[0] for g in grid], dtype=torch.float64)
    wds = torch.tensor([g[1] for g in grid], dtype=torch.float64)

    order = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(settings.seed + 1)).to(x_all.device)
    n_val = min(len(x_all) - 1, max(1, round(settings.val_fraction * len(x_all))))
    val_idx, fit_idx = order[:n_val], order[n_val:]
    fit_x, val_x = standardize(x_all[fit_idx], x_all[val_idx])
    weight, bias = _fit(fit_x, y_all[fit_idx], num_classes, lrs, wds, settings)
    val_acc = (_scores(val_x, weight, bias).argmax(dim=-1) == y_all[val_idx]).double().mean(dim=1)
    sweep = [{"lr": lr, "weight_decay": wd, "val_top1": float(acc)}
             for (lr, wd), acc in zip(grid, val_acc, strict=True)]
    best = int(val_acc.argmax())  # first maximum: ties go to the smaller lr / weight decay
    lr, wd = grid[best]

    train_x, test_x = standardize(x_all, test_features.float().to(x_all.device))
    weight, bias = _fit(train_x, y_all, num_classes, lrs[best:best + 1], wds[best:best + 1], settings)
    scores = _scores(test_x, weight, bias)[0]
    metrics = classification_metrics(scores.cpu(), test_labels.cpu(), num_classes)
    metrics["val_top1"] = float(val_acc[best])
    return ProbeResult(metrics, lr, wd, sweep)
