"""Independent evaluation of a frozen encoder on Fashion-MNIST (separate from ``hjepa_core.eval``).

One protocol for every variant of the quality benchmark:

- images: fixed subsets of Fashion-MNIST train (default 10,000) and test (default all 10,000),
  28x28 grayscale resized to the crop size (32) as 3 channels and normalised exactly as the
  library's eval transform does (:class:`~hjepa_core.data.multicrop_transforms.EvalTransform`
  with ``resize_ratio=1.0``, as ``hjepa_core.eval.features`` uses it);
- features: the encoder's patch tokens, mean-pooled (a class token, if any, is dropped by the
  caller's token function);
- linear probe: multinomial logistic regression on standardised features, full-batch L-BFGS,
  L2 weight decay picked from log-spaced values on a hold-out split of the train features,
  then refit on all train features;
- kNN: weighted, k=20, cosine similarity, temperature 0.07, votes ``exp(sim / T)`` (DINO);
- effective rank (RankMe, Garrido et al. 2023): ``exp`` of the entropy of the normalised
  singular values of the pooled train features (at least 2,000 samples in a real run).

Raw pixels are scored with the same probe and kNN (the normalised 32x32 image, one of its three
identical channels, flattened).

    python benchmarks/quality/independent_eval.py outputs/fashion_mnist/encoder.pt
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from hjepa_core.data.multicrop_transforms import EvalTransform
from hjepa_core.data.sources import load_fashion_mnist
from hjepa_core.utils import atomic_torch_save

TokenFn = Callable[[Tensor], Tensor]
"""Maps normalised images (B, 3, S, S) to patch tokens (B, T, D)."""

WEIGHT_DECAYS = tuple(float(x) for x in np.logspace(-7, -1, 7))  # SSL features pick ~1e-6, pixels ~1e-2


@dataclass
class EvalSettings:
    """What determines the evaluation; stored with every result."""

    num_train: int = 10_000
    num_test: int = 10_000
    crop_size: int = 32
    subset_seed: int = 0
    batch_size: int = 500
    knn_k: int = 20
    knn_temperature: float = 0.07
    weight_decays: tuple[float, ...] = WEIGHT_DECAYS
    holdout_fraction: float = 0.2
    lbfgs_max_iter: int = 300
    rank_samples: int = 10_000
    data_path: str | None = None
    device: str = "cpu"


@dataclass
class EvalImages:
    """Normalised eval images and labels of the fixed subsets."""

    train: Tensor
    train_labels: Tensor
    test: Tensor
    test_labels: Tensor
    train_indices: list[int] = field(default_factory=list)
    test_indices: list[int] = field(default_factory=list)


def _subset(size: int, count: int, seed: int) -> list[int]:
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
    return sorted(order[: min(count, size)].tolist())


def load_eval_images(settings: EvalSettings, cache_dir: str | Path | None = None) -> EvalImages:
    """Fixed Fashion-MNIST train/test subsets through the library's eval transform, cached on disk.

    Args:
        settings: subset sizes, crop size, subset seed, data path.
        cache_dir: folder for the normalised tensors (None: no cache).
    """
    key = f"fmnist-{settings.num_train}-{settings.num_test}-{settings.crop_size}-{settings.subset_seed}"
    path = Path(cache_dir) / f"eval_images-{key}.pt" if cache_dir is not None else None
    if path is not None and path.is_file():
        return EvalImages(**torch.load(path, weights_only=True))
    transform = EvalTransform(settings.crop_size, resize_ratio=1.0)
    parts: dict[str, object] = {}
    for split, count in (("train", settings.num_train), ("test", settings.num_test)):
        source = load_fashion_mnist(settings.data_path, split)
        indices = _subset(len(source), count, settings.subset_seed)
        images, labels = zip(*(source[i] for i in indices), strict=True)
        parts[split] = torch.stack([transform(image) for image in images])
        parts[f"{split}_labels"] = torch.tensor(labels, dtype=torch.long)
        parts[f"{split}_indices"] = indices
    if path is not None:
        atomic_torch_save(parts, path)
    return EvalImages(**parts)  # type: ignore[arg-type]


@torch.no_grad()
def pooled_features(tokens: TokenFn, images: Tensor, batch_size: int = 500, device: str = "cpu") -> Tensor:
    """Mean-pooled patch tokens (N, D) of normalised images, in batches."""
    dev = torch.device(device)
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start: start + batch_size].to(dev)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            out.append(tokens(batch).float().mean(dim=1).cpu())
    return torch.cat(out)


def pixel_features(images: Tensor) -> Tensor:
    """Raw-pixel features: one channel of the normalised grayscale image, flattened."""
    return images[:, 0].flatten(1).float()


def effective_rank(features: Tensor) -> float:
    """RankMe: exp of the entropy of the normalised singular values of (N, D) features."""
    s = torch.linalg.svdvals(features.double())
    p = s / s.sum() + 1e-12
    return float(torch.exp(-(p * p.log()).sum()))


def knn_top1(train: Tensor, train_labels: Tensor, test: Tensor, test_labels: Tensor, k: int = 20,
             temperature: float = 0.07, chunk: int = 1000) -> float:
    """Weighted kNN accuracy: cosine similarity, top-k neighbours voting ``exp(sim / T)``."""
    train_n, test_n = F.normalize(train.float(), dim=1), F.normalize(test.float(), dim=1)
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    correct = 0
    for start in range(0, len(test_n), chunk):
        sim, idx = (test_n[start: start + chunk] @ train_n.T).topk(min(k, len(train_n)), dim=1)
        votes = torch.zeros(len(sim), classes).scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        correct += int((votes.argmax(1) == test_labels[start: start + chunk]).sum())
    return correct / len(test_n)


def _fit_logreg(x: Tensor, y: Tensor, weight_decay: float, max_iter: int,
                init: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Multinomial logistic regression, mean cross-entropy + ``wd / 2 * |W|^2``, full-batch L-BFGS
    started from ``init`` (weights, bias)."""
    w, b = (p.clone().requires_grad_(True) for p in init)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-6,
                            tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _accuracy(x: Tensor, y: Tensor, w: Tensor, b: Tensor) -> float:
    return float(((x @ w + b).argmax(1) == y).float().mean())


def linear_probe(train: Tensor, train_labels: Tensor, test: Tensor, test_labels: Tensor,
                 settings: EvalSettings) -> dict[str, object]:
    """L-BFGS logistic-regression probe; weight decay picked on a hold-out split of ``train``.

    Returns:
        ``top1`` (test accuracy of the refit on all train features), ``weight_decay`` (picked),
        ``holdout`` (hold-out accuracy per weight decay).
    """
    dev = torch.device(settings.device)
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    x, xt = ((train - mean) / std).to(dev), ((test - mean) / std).to(dev)
    y, yt = train_labels.to(dev), test_labels.to(dev)
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(settings.subset_seed)).to(dev)
    cut = max(1, int(len(x) * settings.holdout_fraction))
    hold, fit = order[:cut], order[cut:]
    holdout: dict[float, float] = {}
    params = (x.new_zeros(x.shape[1], classes), x.new_zeros(classes))
    best, best_params = 0.0, params
    for wd in sorted(settings.weight_decays, reverse=True):  # a path: each fit starts from the previous
        params = _fit_logreg(x[fit], y[fit], wd, settings.lbfgs_max_iter, params)
        holdout[wd] = _accuracy(x[hold], y[hold], *params)
        if holdout[wd] > holdout.get(best, -1.0):  # ties: the stronger regulariser (fitted first)
            best, best_params = wd, params
    w, b = _fit_logreg(x, y, best, settings.lbfgs_max_iter, best_params)
    return {"top1": _accuracy(xt, yt, w, b), "weight_decay": best,
            "holdout": {f"{wd:.0e}": acc for wd, acc in holdout.items()}}


def score_features(train: Tensor, test: Tensor, images: EvalImages, settings: EvalSettings) -> dict[str, object]:
    """Probe, kNN and effective rank of precomputed train/test features."""
    start = time.perf_counter()
    probe = linear_probe(train, images.train_labels, test, images.test_labels, settings)
    knn = knn_top1(train, images.train_labels, test, images.test_labels, settings.knn_k, settings.knn_temperature)
    return {"probe_top1": probe["top1"], "probe_weight_decay": probe["weight_decay"],
            "probe_holdout": probe["holdout"], "knn_top1": knn,
            "effective_rank": effective_rank(train[: settings.rank_samples]),
            "rank_samples": min(len(train), settings.rank_samples), "feature_dim": int(train.shape[1]),
            "score_seconds": time.perf_counter() - start}


def evaluate_tokens(tokens: TokenFn, images: EvalImages, settings: EvalSettings) -> dict[str, object]:
    """The full protocol for an encoder given as a token function (frozen, eval mode)."""
    start = time.perf_counter()
    train = pooled_features(tokens, images.train, settings.batch_size, settings.device)
    test = pooled_features(tokens, images.test, settings.batch_size, settings.device)
    extract = time.perf_counter() - start
    return {**score_features(train, test, images, settings), "extract_seconds": extract}


def evaluate_pixels(images: EvalImages, settings: EvalSettings) -> dict[str, object]:
    """The protocol on raw pixels."""
    return score_features(pixel_features(images.train), pixel_features(images.test), images, settings)


def hjepa_tokens(checkpoint: str | Path, which: str = "target", device: str = "cpu") -> TokenFn:
    """Token function of an H-JEPA encoder.

    Args:
        checkpoint: ``encoder.pt`` (target encoder) or a training ``checkpoint-*.pt`` (both encoders).
        which: ``target`` (EMA) or ``context`` (online) encoder; ``context`` needs a training checkpoint.
        device: where the encoder runs.
    """
    from hjepa_core.config import config_from_dict
    from hjepa_core.models.vit import build_encoder
    from hjepa_core.train.checkpoint import load_checkpoint

    state = load_checkpoint(checkpoint)
    encoder = build_encoder(config_from_dict(state["config"]).model)
    if "state_dict" in state:
        if which != "target":
            raise ValueError(f"{checkpoint} holds only the target encoder; pass a training checkpoint")
        weights = state["state_dict"]
    else:
        prefix = {"target": "target_encoder.", "context": "encoder."}[which]
        weights = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
    encoder.load_state_dict(weights)
    encoder.requires_grad_(False).eval().to(device)
    return encoder


def main(argv: list[str] | None = None) -> None:
    """Scores one H-JEPA checkpoint and prints the metrics as JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="encoder.pt or checkpoints/checkpoint-*.pt")
    parser.add_argument("--encoder", choices=["target", "context"], default="target")
    parser.add_argument("--num_train", type=int, default=10_000)
    parser.add_argument("--num_test", type=int, default=10_000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = EvalSettings(num_train=args.num_train, num_test=args.num_test, device=args.device)
    images = load_eval_images(settings)
    result = evaluate_tokens(hjepa_tokens(args.checkpoint, args.encoder, args.device), images, settings)
    print(json.dumps({"settings": asdict(settings), **result}, indent=2, default=str))


if __name__ == "__main__":
    main()
