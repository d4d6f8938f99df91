"""Classification metrics shared by the linear probe and kNN: top-k, per-class accuracy, confusion."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def confusion_matrix(predictions: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """(C, C) counts; row = true class, column = predicted class."""
    index = labels.long() * num_classes + predictions.long()
    return torch.bincount(index, minlength=num_classes * num_classes).view(num_classes, num_classes)


def classification_metrics(scores: Tensor, labels: Tensor, num_classes: int) -> dict[str, Any]:
    """Top-1 (and top-5 when there are more than 5 classes), per-class accuracy, confusion matrix.

    Args:
        scores: (N, C) class scores (logits, probabilities or kNN votes); higher is better.
        labels: (N,) true classes.
        num_classes: C.
    Returns:
        ``{"top1", "top5"?, "per_class": [C floats, nan for absent classes], "confusion": C x C}``.
    """
    if scores.ndim != 2 or scores.shape[1] != num_classes:
        raise ValueError(f"scores must be (N, {num_classes}), got {tuple(scores.shape)}")
    labels = labels.long()
    predictions = scores.argmax(dim=1)
    confusion = confusion_matrix(predictions, labels, num_classes)
    support = confusion.sum(dim=1)
    per_class = torch.where(support > 0, confusion.diag().double() / support.clamp_min(1), torch.nan)
    out: dict[str, Any] = {"top1": float((predictions == labels).double().mean()) if len(labels) else float("nan")}
    if num_classes > 5:
        top5 = scores.topk(5, dim=1).indices
        out["top5"] = float((top5 == labels[:, None]).any(dim=1).double().mean()) if len(labels) else float("nan")
    out["per_class"] = per_class.tolist()
    out["confusion"] = confusion.tolist()
    return out
