"""Online kNN accuracy during pretraining, so that collapse shows early.

A small fixed subset of the training data (the memory bank) and of the test data (queries) is
loaded once as uint8 centre crops; every call embeds both with the current target encoder
(mean-pooled tokens) and scores weighted kNN (Wu et al., 2018), as DINO's training logs do
(Caron et al., 2021). A collapsed encoder drops to chance level.

Under DDP every rank takes part: each keeps and embeds its own share of both subsets, the
features are all-gathered, and every rank scores the same kNN. So a monitor call costs each
rank 1/world of the embedding work and no rank waits at the next collective while another
evaluates.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from hjepa_core.config import Config
from hjepa_core.data.sources import DatasetNotFoundError
from hjepa_core.eval.features import EvalError, encode_pixels, open_source, pixel_batches, source_classes
from hjepa_core.eval.knn import DEFAULT_K, DEFAULT_TEMPERATURE, knn_evaluate
from hjepa_core.models.vit import VisionTransformer

# Subset sizes when the caller gives none (the engine's hook does not): ~3k small images embed in
# seconds on a CPU.
DEFAULT_TRAIN_SAMPLES = 2000
DEFAULT_TEST_SAMPLES = 1000


def _world() -> tuple[int, int]:
    """(rank, world size) of the initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _share(total: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s contiguous share of ``total`` rows (equal shares, the last one shorter)."""
    chunk = math.ceil(total / world_size)
    return slice(min(rank * chunk, total), min((rank + 1) * chunk, total))


def _all_gather_rows(part: Tensor, total: int, device: torch.device) -> Tensor:
    """Every rank's :func:`_share` of a (total, F) tensor, concatenated in rank order (on CPU)."""
    world_size = _world()[1]
    if world_size == 1:
        return part
    chunk = math.ceil(total / world_size)
    # gloo gathers host tensors; nccl needs them on the rank's GPU.
    where = device if dist.get_backend() == "nccl" else torch.device("cpu")
    padded = F.pad(part, (0, 0, 0, chunk - len(part))).to(where)
    gathered = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(gathered, padded)
    return torch.cat(gathered).cpu()[:total]


def _load_pixels(source: Dataset, crop_size: int, batch_size: int) -> tuple[Tensor, Tensor]:
    batches = list(pixel_batches(source, crop_size, batch_size))
    return torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]).long()


class KnnMonitor:
    """Weighted-kNN top-1/top-5 of an encoder on a fixed subset of the config's dataset.

    Args:
        config: the training config (``data.dataset``, ``data.data_path``, global crop size).
        device: where the encoder runs.
        train_samples, test_samples: subset sizes (fixed subsets, the same every call); None:
            :data:`DEFAULT_TRAIN_SAMPLES` / :data:`DEFAULT_TEST_SAMPLES`.
        k, temperature: the kNN vote (Wu et al., 2018).
        batch_size: images per forward pass.

    When the dataset has no test split, the queries are held out from the training subset.
    """

    def __init__(
        self,
        config: Config,
        device: torch.device | str = "cpu",
        train_samples: int | None = None,
        test_samples: int | None = None,
        k: int = DEFAULT_K,
        temperature: float = DEFAULT_TEMPERATURE,
        batch_size: int = 256,
    ) -> None:
        self.device = torch.device(device)
        self.k, self.temperature, self.batch_size = k, temperature, batch_size
        crop = config.data.multicrop.global_crop_size
        train_samples = train_samples or DEFAULT_TRAIN_SAMPLES
        test_samples = test_samples or DEFAULT_TEST_SAMPLES
        data = config.data
        train = open_source(data.dataset, data.data_path, "train", train_samples)
        self.train_pixels, self.train_labels = _load_pixels(train, crop, batch_size)
        try:
            test = open_source(data.dataset, data.data_path, "test", test_samples)
            self.test_pixels, self.test_labels = _load_pixels(test, crop, batch_size)
        except (DatasetNotFoundError, EvalError):
            held_out = max(1, min(test_samples, len(self.train_labels) // 3))
            self.test_pixels, self.test_labels = self.train_pixels[-held_out:], self.train_labels[-held_out:]
            self.train_pixels, self.train_labels = self.train_pixels[:-held_out], self.train_labels[:-held_out]
        labels = torch.cat([self.train_labels, self.test_labels])
        self.num_classes = len(source_classes(train, labels))
        # Under DDP this rank keeps only the pixels it embeds; labels stay whole for the vote.
        rank, world_size = _world()
        self.train_pixels = self.train_pixels[_share(len(self.train_labels), rank, world_size)]
        self.test_pixels = self.test_pixels[_share(len(self.test_labels), rank, world_size)]
        self.embedded = 0  # images this rank embedded in the last call

    @torch.no_grad()
    def _embed(self, encoder: VisionTransformer, pixels: Tensor) -> Tensor:
        if not len(pixels):  # a rank whose share is empty (fewer images than ranks)
            return torch.zeros(0, encoder.embed_dim)
        return torch.cat([encode_pixels(encoder, pixels[i:i + self.batch_size], "mean", 1, self.device)
                          for i in range(0, len(pixels), self.batch_size)])

    def run(self, encoder: VisionTransformer) -> dict[str, float]:
        """``{"knn_monitor/top1": ..., "knn_monitor/top5": ...}`` for ``encoder`` (left in its mode).

        Under DDP every rank must call it (the features are all-gathered); all get the same result.
        """
        was_training = encoder.training
        encoder.eval()
        try:
            train = self._embed(encoder, self.train_pixels)
            test = self._embed(encoder, self.test_pixels)
        finally:
            encoder.train(was_training)
        self.embedded = len(train) + len(test)
        train = _all_gather_rows(train, len(self.train_labels), self.device)
        test = _all_gather_rows(test, len(self.test_labels), self.device)
        result = knn_evaluate(train, self.train_labels, test, self.test_labels, self.num_classes,
                              self.k, self.temperature)
        out = {"knn_monitor/top1": result["top1"]}
        if "top5" in result:
            out["knn_monitor/top5"] = result["top5"]
        return out


class EpochKnnMonitor:
    """The training engine's epoch monitor for ``data.knn_monitor_every``: a :class:`KnnMonitor`
    on the config's dataset, built on first use (after the process group exists, so each rank
    loads only its share)."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self._monitor: KnnMonitor | None = None

    def __call__(self, encoder: VisionTransformer, device: torch.device) -> dict[str, float]:
        if self._monitor is None:
            self._monitor = KnnMonitor(self.config, device)
        return self._monitor.run(encoder)


def epoch_monitor(config: Config) -> EpochKnnMonitor | None:
    """The monitor ``config`` asks for (``data.knn_monitor_every > 0``), else None."""
    return EpochKnnMonitor(config) if config.data.knn_monitor_every else None
