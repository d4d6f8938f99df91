import pytest
import torch

from hjepa_core.eval.knn import knn_evaluate, knn_scores
from hjepa_core.eval.metrics import classification_metrics


def test_separable_features_give_near_perfect_knn(separable):
    x_train, y_train, x_test, y_test = separable
    result = knn_evaluate(x_train, y_train, x_test, y_test, 10)
    assert result["top1"] >= 0.99 and result["k"] == 20 and result["temperature"] == 0.07


def test_random_labels_give_chance_knn():
    g = torch.Generator().manual_seed(2)
    x_train, x_test = torch.randn(3000, 16, generator=g), torch.randn(2000, 16, generator=g)
    y_train, y_test = torch.randint(0, 5, (3000,), generator=g), torch.randint(0, 5, (2000,), generator=g)
    assert abs(knn_evaluate(x_train, y_train, x_test, y_test, 5)["top1"] - 0.2) < 0.04


def test_votes_are_weighted_by_cosine_similarity():
    """One very close neighbour of class 1 outvotes two far ones of class 0 at a low temperature."""
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    labels = torch.tensor([1, 0, 0])
    query = torch.tensor([[1.0, 0.05]])
    scores = knn_scores(train, labels, query, 2, k=3, temperature=0.07)
    assert scores.argmax() == 1
    assert torch.allclose(scores.sum(), torch.exp(torch.nn.functional.cosine_similarity(
        query, train).div(0.07)).sum())
    # with k larger than the training set, k is clipped
    assert knn_scores(train, labels, query, 2, k=50).shape == (1, 2)
    with pytest.raises(ValueError, match="temperature"):
        knn_scores(train, labels, query, 2, temperature=0.0)


def test_classification_metrics_known_answer():
    scores = torch.eye(3)[torch.tensor([0, 1, 1, 2])]  # predictions 0, 1, 1, 2
    result = classification_metrics(scores, torch.tensor([0, 1, 2, 2]), 3)
    assert result["top1"] == 0.75
    assert result["per_class"] == [1.0, 1.0, 0.5]
    assert result["confusion"] == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]


def test_classification_metrics_top5_and_absent_classes():
    scores = torch.arange(10.0).repeat(4, 1)  # every row ranks classes 9, 8, 7, 6, 5, ...
    result = classification_metrics(scores, torch.tensor([9, 5, 4, 9]), 10)
    assert result["top1"] == 0.5 and result["top5"] == 0.75
    assert result["per_class"][9] == 1.0 and result["per_class"][4] == 0.0
    assert all(torch.isnan(torch.tensor(result["per_class"][c])) for c in (0, 1, 2, 3, 6, 7, 8))
    assert sum(map(sum, result["confusion"])) == 4
