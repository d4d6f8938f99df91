"""Weighted k-nearest-neighbour classification on frozen features.

The protocol of Wu et al. (2018, "Unsupervised Feature Learning via Non-Parametric Instance
Discrimination"), as used to evaluate DINO (Caron et al., 2021): L2-normalised features, cosine
similarity, the k most similar training samples each vote for their class with weight
``exp(similarity / temperature)``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from hjepa_core.eval.metrics import classification_metrics

DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07


@torch.no_grad()
def knn_scores(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    num_classes: int,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    chunk_size: int = 1024,
) -> Tensor:
    """(N_test, C) class votes of each test sample's ``k`` nearest training samples.

    Args:
        train_features, test_features: (N, D) features (any scale; they are L2-normalised here).
        train_labels: (N_train,) integer classes.
        num_classes: C.
        k: neighbours (clipped to the training set's size).
        temperature: softness of the vote weights ``exp(cos / temperature)``.
        chunk_size: test samples per similarity block (bounds memory at chunk x N_train).
    """
    if k < 1 or temperature <= 0:
        raise ValueError(f"need k >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    if train_features.shape[1] != test_features.shape[1]:
        raise ValueError(f"train features have {train_features.shape[1]} dims, test {test_features.shape[1]}")
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    labels = train_labels.long().to(train.device)
    k = min(k, len(train))
    votes = []
    for start in range(0, len(test), chunk_size):
        similarity = test[start:start + chunk_size] @ train.T
        top_sim, top_idx = similarity.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        scores = torch.zeros(len(top_sim), num_classes, device=train.device, dtype=weights.dtype)
        scores.scatter_add_(1, labels[top_idx], weights)
        votes.append(scores)
    return torch.cat(votes) if votes else torch.zeros(0, num_classes)


def knn_evaluate(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    test_labels: Tensor,
    num_classes: int,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
) -> dict[str, Any]:
    """Weighted kNN metrics (top-1, top-5, per-class accuracy, confusion) on the test set."""
    scores = knn_scores(train_features, train_labels, test_features, num_classes, k, temperature)
    result = classification_metrics(scores.cpu(), test_labels.cpu(), num_classes)
    result.update(k=k, temperature=temperature)
    return result
