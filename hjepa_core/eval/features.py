"""Frozen-encoder features: loading an encoder checkpoint, extraction, pooling and an on-disk cache.

Images pass through :class:`~hjepa_core.data.multicrop_transforms.EvalTransform` at the
encoder's global crop size; the target encoder's patch tokens are pooled into one vector per
image. Poolings (``pooling=``):

- ``mean`` (default): average of the patch tokens (I-JEPA's linear-probe feature, Assran et al., 2023).
- ``max``: per-dimension max over tokens; ``mean_max``: both, concatenated.
- ``level:K``: the hierarchy level K's target space of H-JEPA: tokens layer-normed, average-pooled
  over 2^K x 2^K windows, layer-normed again (as :meth:`HJEPA._targets` builds targets), then
  averaged over the level's cells. ``levels`` concatenates every level.

Features are cached as ``.pt`` files keyed by everything that determines them (checkpoint sha256
or baseline identity, dataset and a fingerprint of its files, split, subset size, crop size and
pooling), so a second evaluation of the same checkpoint on the same data skips extraction.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm

from hjepa_core.config import Config, ConfigError, config_from_dict
from hjepa_core.data.multicrop_transforms import EvalTransform
from hjepa_core.models.vit import VisionTransformer, build_encoder, resolve_encoder_size
from hjepa_core.utils import atomic_torch_save, sha256_file

ENCODER_KEYS = ("patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "use_rope")


class EvalError(ValueError):
    """Bad evaluation input (checkpoint, config, dataset, option); the message says what to fix."""


@dataclass
class LoadedEncoder:
    """A frozen encoder rebuilt from a checkpoint, with the config it was trained with."""

    encoder: VisionTransformer
    config: Config
    path: Path
    sha256: str
    mlflow_run_id: str | None = None
    context_encoder: VisionTransformer | None = None
    """The online (context) encoder, when the checkpoint holds it (``encoder.pt`` from this
    version on, and every training checkpoint)."""

    @property
    def crop_size(self) -> int:
        """Evaluation crop side: the global crop size the encoder was trained on."""
        return self.config.data.multicrop.global_crop_size

    @property
    def levels(self) -> int:
        return self.config.masking.num_hierarchies


def _expected_arch(config: Config) -> dict[str, Any]:
    m = config.model
    return {"patch_size": m.patch_size, "mlp_ratio": float(m.mlp_ratio), "use_rope": m.use_rope,
            **resolve_encoder_size(m)}


def _arch_mismatch(arch: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    return [f"{key}: checkpoint {arch.get(key)!r} vs config {expected[key]!r}"
            for key in ENCODER_KEYS if key in expected and arch.get(key) != expected[key]]


def load_encoder(checkpoint: str | Path, config: Config | None = None) -> LoadedEncoder:
    """Rebuilds the frozen target encoder from ``encoder.pt`` or a training ``checkpoint-*.pt``.

    Args:
        checkpoint: an ``encoder.pt`` (``hjepa train`` output), a training checkpoint, or the
            training output directory holding ``encoder.pt``.
        config: when given, its model must match the checkpoint's; it also sets the crop size.
    Raises:
        FileNotFoundError: no such file.
        EvalError: unreadable file, no stored config, or architecture/weights/config mismatch.
    """
    path = Path(checkpoint)
    if path.is_dir():
        path = path / "encoder.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; pass the encoder.pt that `hjepa train` wrote to "
            "training.output_dir (or a checkpoints/checkpoint-*.pt)"
        )
    from hjepa_core.train.checkpoint import load_checkpoint

    try:
        state = load_checkpoint(path)
    except ValueError as exc:
        raise EvalError(str(exc)) from exc
    if not isinstance(state, dict) or "config" not in state:
        raise EvalError(f"{path} holds no training config; it is not an hjepa encoder.pt or training checkpoint")
    try:
        stored = config_from_dict(state["config"])
    except ConfigError as exc:
        raise EvalError(f"{path}: its stored config is invalid ({exc})") from exc
    context_weights = None
    if "arch" in state and "state_dict" in state:
        arch, weights = dict(state["arch"]), state["state_dict"]
        context_weights = state.get("context_state_dict")
    elif "model" in state:
        weights = _prefixed(state["model"], "target_encoder.")
        context_weights = _prefixed(state["model"], "encoder.")
        arch = build_encoder(stored.model).arch()
    else:
        raise EvalError(f"{path} has neither encoder weights ('arch'/'state_dict') nor a training 'model'")
    problems = _arch_mismatch(arch, _expected_arch(stored))
    if problems:
        raise EvalError(f"{path}: encoder architecture does not match its own stored config ({'; '.join(problems)})")
    if config is not None:
        problems = _arch_mismatch(arch, _expected_arch(config))
        if problems:
            raise EvalError(
                f"checkpoint/config mismatch: {path} was trained with a different model ({'; '.join(problems)}); "
                "evaluate it with the config it was trained with, or without --config"
            )
    encoder = _frozen_encoder(arch, weights, path)
    context = _frozen_encoder(arch, context_weights, path) if context_weights else None
    return LoadedEncoder(encoder, config if config is not None else stored, path, sha256_file(path),
                         state.get("mlflow_run_id") or None, context)


def _prefixed(state_dict: dict[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def _frozen_encoder(arch: dict[str, Any], weights: dict[str, Any], path: Path) -> VisionTransformer:
    encoder = VisionTransformer(**arch)
    try:
        encoder.load_state_dict(weights)
    except RuntimeError as exc:
        raise EvalError(f"{path}: weights do not fit the architecture {arch} ({exc})") from exc
    return encoder.requires_grad_(False).eval()


def check_pooling(pooling: str, levels: int) -> str:
    """Validates a pooling name (see the module docstring) and returns it."""
    if pooling in ("mean", "max", "mean_max", "levels"):
        return pooling
    name, _, index = pooling.partition(":")
    if name == "level" and index.isdigit() and int(index) < levels:
        return pooling
    choices = ["mean", "max", "mean_max", "levels", *(f"level:{k}" for k in range(levels))]
    raise EvalError(f"pooling {pooling!r} is not one of {', '.join(choices)}")


def _level_feature(tokens: Tensor, level: int) -> Tensor:
    n, t, d = tokens.shape
    side = round(t**0.5)
    normed = F.layer_norm(tokens, (d,))
    if level == 0:
        return normed.mean(dim=1)
    window = 2**level
    if side % window:
        raise EvalError(f"level {level} needs a token grid divisible by {window}, got {side}x{side}")
    grid = normed.transpose(1, 2).reshape(n, d, side, side)
    coarse = F.avg_pool2d(grid, window, window).flatten(2).transpose(1, 2)
    return F.layer_norm(coarse, (d,)).mean(dim=1)


def pool_tokens(tokens: Tensor, pooling: str = "mean", levels: int = 1) -> Tensor:
    """(N, T, D) patch tokens -> (N, F) features by ``pooling`` (see the module docstring)."""
    tokens = tokens.float()
    if pooling == "mean":
        return tokens.mean(dim=1)
    if pooling == "max":
        return tokens.amax(dim=1)
    if pooling == "mean_max":
        return torch.cat([tokens.mean(dim=1), tokens.amax(dim=1)], dim=1)
    if pooling == "levels":
        return torch.cat([_level_feature(tokens, k) for k in range(levels)], dim=1)
    return _level_feature(tokens, int(check_pooling(pooling, levels).partition(":")[2]))


class _ListSource(Dataset):
    """Samples held in memory, with the source's ``classes`` and ``integrity`` (shards)."""

    def __init__(self, samples: list[tuple[Any, int]], classes: list[str], integrity: Any = None) -> None:
        self.samples, self.classes, self.integrity = samples, classes, integrity

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        return self.samples[index]


def open_source(
    dataset: str, data_path: str | None = None, split: str = "train", max_samples: int | None = None
) -> Dataset:
    """A ``(PIL image, label)`` source through :func:`~hjepa_core.data.sources.build_source`.

    ``max_samples`` keeps a fixed random subset of a map-style source (``build_source``'s), and
    evenly spaced samples of a stream (shards: every ``len // max_samples``-th sample, read once
    and held in memory; the first ``max_samples`` when the stream's length is unknown).

    Raises:
        EvalError: unknown dataset or split, bad option; DatasetNotFoundError: missing files.
    """
    from hjepa_core.data.sources import DatasetNotFoundError, SubsetSource, build_source

    try:
        source = build_source(dataset, data_path, split)
    except DatasetNotFoundError:
        raise
    except (ValueError, TypeError, KeyError) as exc:
        raise EvalError(f"dataset {dataset!r} ({split} split): {exc}") from exc
    if max_samples is None:
        return source
    if max_samples < 1:
        raise EvalError(f"max samples must be >= 1, got {max_samples}")
    if not isinstance(source, IterableDataset):
        return SubsetSource(source, max_samples) if max_samples < len(source) else source  # type: ignore[arg-type]
    try:
        stride = max(1, len(source) // max_samples)  # type: ignore[arg-type]
    except TypeError:
        stride = 1
    kept = [sample for i, sample in zip(range(stride * max_samples), source, strict=False) if i % stride == 0]
    return _ListSource(kept, list(getattr(source, "classes", [])), getattr(source, "integrity", None))


def source_classes(source: Dataset, labels: Tensor) -> list[str]:
    """The source's class names, or ``"0".."C-1"`` when it has none."""
    classes = list(getattr(source, "classes", []) or [])
    needed = int(labels.max()) + 1 if len(labels) else 0
    return classes if len(classes) >= needed else [str(i) for i in range(needed)]


class _PixelDataset(Dataset):
    def __init__(self, source: Dataset, transform: EvalTransform) -> None:
        self.source, self.transform = source, transform

    def __len__(self) -> int:
        return len(self.source)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.source[index]
        return self.transform.pixels(image), int(label)


class _PixelStream(IterableDataset):
    def __init__(self, source: IterableDataset, transform: EvalTransform) -> None:
        self.source, self.transform = source, transform

    def __iter__(self) -> Iterator[tuple[Tensor, int]]:
        for image, label in self.source:
            yield self.transform.pixels(image), int(label)


def pixel_batches(
    source: Dataset, crop_size: int, batch_size: int = 256, num_workers: int = 0,
    progress: bool = False, desc: str = "features",
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yields ``(uint8 (B, 3, S, S), labels (B,))`` centre crops of a ``(PIL, label)`` source.

    Map-style sources come in order; streams (shards) in their reading order.
    """
    transform = EvalTransform(crop_size, resize_ratio=1.0)
    wrapped = (_PixelStream(source, transform) if isinstance(source, IterableDataset)
               else _PixelDataset(source, transform))
    loader = DataLoader(wrapped, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    try:
        total = len(loader)
    except TypeError:
        total = None
    yield from tqdm(loader, desc=desc, total=total, disable=not progress, dynamic_ncols=True, leave=False)


def normalize_pixels(pixels: Tensor) -> Tensor:
    """uint8 (B, 3, S, S) -> float, normalised as :class:`EvalTransform` does."""
    transform = EvalTransform(pixels.shape[-1], resize_ratio=1.0)
    mean, std = transform.mean.to(pixels.device), transform.std.to(pixels.device)
    return (pixels.float() / 255.0 - mean) / std


@torch.no_grad()
def encode_pixels(
    encoder: VisionTransformer, pixels: Tensor, pooling: str = "mean", levels: int = 1,
    device: torch.device | str = "cpu",
) -> Tensor:
    """Pooled features (B, F) of a uint8 (B, 3, S, S) batch; bf16 autocast on CUDA."""
    device = torch.device(device)
    images = normalize_pixels(pixels.to(device, non_blocking=True))
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        tokens = encoder(images)
    return pool_tokens(tokens, pooling, levels).cpu()


def extract_features(
    encoder: VisionTransformer | None,
    source: Dataset,
    crop_size: int,
    pooling: str = "mean",
    levels: int = 1,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = False,
    desc: str = "features",
    pixel_size: int = 32,
) -> tuple[Tensor, Tensor]:
    """Features and labels of every sample of ``source``, in order.

    With ``encoder=None`` the features are raw pixels: the eval crop, resized to at most
    ``pixel_size`` (antialiased) and flattened, kept as uint8.
    """
    features, labels = [], []
    if encoder is not None:
        was_training = encoder.training
        encoder.eval().to(device)
    for pixels, batch_labels in pixel_batches(source, crop_size, batch_size, num_workers, progress, desc):
        if encoder is not None:
            features.append(encode_pixels(encoder, pixels, pooling, levels, device))
        else:
            if pixels.shape[-1] > pixel_size:
                pixels = F.interpolate(pixels.float(), size=(pixel_size, pixel_size), mode="bilinear",
                                       antialias=True).round().clamp(0, 255).to(torch.uint8)
            features.append(pixels.flatten(1))
        labels.append(batch_labels)
    if encoder is not None:
        encoder.train(was_training)
    if not features:
        raise EvalError(f"{desc}: the dataset is empty")
    return torch.cat(features), torch.cat(labels).long()


def data_fingerprint(dataset: str, data_path: str | None, split: str) -> str:
    """A digest of the data a split is read from, so the cache never serves features of replaced
    files: for shards, the split's manifest entry (which holds its shards' sha256) and each local
    shard's path, size and mtime; for raw datasets, the path, size and mtime of every file in the
    folder."""
    from hjepa_core.data.shards import resolve_shards, shard_spec_from
    from hjepa_core.data.shards.spec import local_path
    from hjepa_core.data.sources import find_fashion_mnist

    def stat(path: Path) -> list[Any]:
        info = path.stat()
        return [str(path), info.st_size, info.st_mtime_ns]

    spec = shard_spec_from(dataset, data_path)
    if spec is not None:
        shards = resolve_shards(spec, split)
        files = [stat(p) if (p := local_path(url)) is not None else [url] for url in shards.urls]
        parts: list[Any] = [shards.split_info, files]
    else:
        name, _, inline = dataset.partition(":")
        root: str | Path | None = inline or data_path
        if name.lower().replace("-", "_") == "fashion_mnist":
            root = find_fashion_mnist(root)
        folder = Path(root).resolve() if root else None
        paths = sorted(p for p in folder.rglob("*") if p.is_file()) if folder and folder.is_dir() else []
        parts = [str(folder), [stat(p) for p in paths]]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


class FeatureCache:
    """Feature files under ``root`` keyed by a digest of what determines them; ``root=None`` disables it.

    ``hits`` and ``misses`` count lookups (tests and reports use them).
    """

    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root) if root is not None else None
        self.hits = 0
        self.misses = 0

    def path(self, key: dict[str, Any]) -> Path | None:
        if self.root is None:
            return None
        text = json.dumps(key, sort_keys=True, default=str)
        digest = hashlib.sha256(text.encode()).hexdigest()[:24]
        return self.root / f"{key.get('kind', 'features')}-{key.get('split', 'all')}-{digest}.pt"

    def get_or_compute(
        self, key: dict[str, Any], compute: Callable[[], tuple[Tensor, Tensor]],
        keep: Callable[[], bool] | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Cached ``(features, labels)`` for ``key``, computing them on a miss and storing them
        unless ``keep()`` says no (features of data read with losses are not cached, so the
        next run reads, and reports, the damage again)."""
        path = self.path(key)
        text = json.dumps(key, sort_keys=True, default=str)
        if path is not None and path.is_file():
            try:
                stored = torch.load(path, map_location="cpu", weights_only=True)
            except Exception:  # a damaged cache file is recomputed, never trusted
                stored = None
            if isinstance(stored, dict) and stored.get("key") == text:
                self.hits += 1
                return stored["features"], stored["labels"]
        self.misses += 1
        features, labels = compute()
        if path is not None and (keep is None or keep()):
            atomic_torch_save({"key": text, "features": features, "labels": labels}, path)
        return features, labels
