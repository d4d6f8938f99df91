"""The registered encoder as MLflow loads it: weights plus architecture, no pickled classes.

:func:`save_serving_encoder` writes one file holding only plain values (the ViT's constructor
arguments, its state dict, the crop size and the pixel normalisation); :func:`load_serving_encoder`
rebuilds the encoder from it with ``torch.load(weights_only=True)``. A registered model version
is an MLflow pyfunc model whose ``loader_module`` is this module and whose ``code_paths`` carry
``hjepa_core``, so ``mlflow.pyfunc.load_model("models:/hjepa-encoder@champion")`` needs torch and
the libraries ``hjepa_core`` imports, not the ``hjepa`` package and nothing unpickled.

Input: uint8 RGB images ``(N, 3, S, S)``, S the crop size in the file (``crop_size``): the
centre crops the evaluation scores. Output: float32 features ``(N, D)``, the mean of the patch
tokens (the evaluation's default ``mean`` pooling).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from hjepa_core.constants import IMAGENET_MEAN, IMAGENET_STD
from hjepa_core.models.vit import VisionTransformer

SERVING_FORMAT = "hjepa-serving-encoder"
SERVING_VERSION = 1
_BATCH = 256


class ServingEncoder:
    """A frozen encoder with its input contract; :meth:`predict` maps images to features."""

    def __init__(self, encoder: VisionTransformer, crop_size: int, mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD) -> None:
        self.encoder = encoder.requires_grad_(False).eval()
        self.crop_size = int(crop_size)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    @torch.no_grad()
    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> np.ndarray:
        """uint8 ``(N, 3, S, S)`` images -> float32 ``(N, D)`` mean-pooled features.

        Raises:
            ValueError: the input is not a batch of 3-channel ``crop_size`` images.
        """
        pixels = torch.as_tensor(np.asarray(model_input))
        expected = (3, self.crop_size, self.crop_size)
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != expected:
            raise ValueError(f"expected images of shape (N, {', '.join(map(str, expected))}), "
                             f"got {tuple(pixels.shape)}")
        features = []
        for start in range(0, len(pixels), _BATCH):
            images = (pixels[start:start + _BATCH].float() / 255.0 - self.mean) / self.std
            features.append(self.encoder(images).float().mean(dim=1))
        if not features:
            return np.zeros((0, self.encoder.embed_dim), dtype=np.float32)
        return torch.cat(features).numpy()


def save_serving_encoder(encoder: VisionTransformer, crop_size: int, path: str | Path) -> Path:
    """Writes the encoder's architecture, weights and input contract to ``path`` (plain values only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"format": SERVING_FORMAT, "version": SERVING_VERSION, "arch": encoder.arch(),
                "state_dict": {k: v.detach().cpu() for k, v in encoder.state_dict().items()},
                "crop_size": int(crop_size), "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}, path)
    return path


def load_serving_encoder(path: str | Path) -> ServingEncoder:
    """Rebuilds the encoder written by :func:`save_serving_encoder` (``weights_only`` load).

    Raises:
        ValueError: ``path`` is not a serving-encoder file.
    """
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != SERVING_FORMAT:
        raise ValueError(f"{path} is not an hjepa serving encoder (written by save_serving_encoder)")
    encoder = VisionTransformer(**state["arch"])
    encoder.load_state_dict(state["state_dict"])
    return ServingEncoder(encoder, state["crop_size"], tuple(state["mean"]), tuple(state["std"]))


def _load_pyfunc(data_path: str) -> ServingEncoder:
    """MLflow's pyfunc hook (this module is the model's ``loader_module``)."""
    return load_serving_encoder(data_path)
