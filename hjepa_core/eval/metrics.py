"""Classification metrics shared by the linear probe and kNN (torchmetrics): top-k, per-class
accuracy, confusion matrix."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics.functional.classification import multiclass_accuracy, multiclass_confusion_matrix


def classification_metrics(scores: Tensor, labels: Tensor, num_classes: int) -> dict[str, Any]:
    """Top-1 (and top-5 when there are more than 5 classes), per-class accuracy, confusion matrix.

    Args:
        scores: (N, C) class scores (logits, probabilities or kNN votes); higher is better.
        labels: (N,) true classes.
        num_classes: C.
    Returns:
        ``{"top1", "top5"?, "per_class": [C floats, nan for absent classes], "confusion": C x C}``
        (confusion: row = true class, column = predicted class).
    """
    if scores.ndim != 2 or scores.shape[1] != num_classes:
        raise ValueError(f"scores must be (N, {num_classes}), got {tuple(scores.shape)}")
    labels = labels.long()
    if not len(labels):
        nan = float("nan")
        return {"top1": nan, **({"top5": nan} if num_classes > 5 else {}), "per_class": [nan] * num_classes,
                "confusion": [[0] * num_classes for _ in range(num_classes)]}
    scores = scores.float()
    confusion = multiclass_confusion_matrix(scores, labels, num_classes)
    support = confusion.sum(dim=1)
    # torchmetrics scores an absent class 0; nan keeps "no test images" apart from "all wrong".
    per_class = torch.where(support > 0, confusion.diag().double() / support.clamp_min(1), torch.nan)
    out: dict[str, Any] = {"top1": float(multiclass_accuracy(scores, labels, num_classes, average="micro"))}
    if num_classes > 5:
        out["top5"] = float(multiclass_accuracy(scores, labels, num_classes, average="micro", top_k=5))
    out["per_class"] = per_class.tolist()
    out["confusion"] = confusion.tolist()
    return out
