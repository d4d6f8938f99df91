"""Batched photometric augmentation: policy checks, identities, determinism, chunking, devices."""

from __future__ import annotations

import pytest
import torch

from hjepa_core.data import photometric
from hjepa_core.data.photometric import IMAGENET_MEAN, IMAGENET_STD, AugmentPolicy, BatchPhotometric

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _pixels(n: int = 6, size: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8,
                         generator=torch.Generator().manual_seed(seed))


def _unnormalize(x: torch.Tensor) -> torch.Tensor:
    return (x * STD + MEAN) * 255.0


@pytest.mark.parametrize(
    ("field", "value"),
    [("color_jitter_prob", 1.5), ("grayscale_prob", -0.1), ("blur_prob", 2.0),
     ("solarize_prob", -1.0), ("color_jitter", 1.5), ("blur_sigma", (0.0, 1.0))],
)
def test_policy_rejects_invalid_values(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field.split("_prob")[0]):
        AugmentPolicy(**{field: value})


def test_rejects_non_uint8_or_wrong_shape() -> None:
    aug = BatchPhotometric(AugmentPolicy())
    with pytest.raises(ValueError, match="uint8"):
        aug(torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="uint8"):
        aug(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))


def test_no_augmentation_is_plain_normalisation() -> None:
    x = _pixels()
    out = BatchPhotometric(AugmentPolicy(color_jitter=0.0))(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    torch.testing.assert_close(out, (x.float() / 255.0 - MEAN) / STD)
    off = BatchPhotometric(AugmentPolicy(color_jitter_prob=0.0))(x)
    torch.testing.assert_close(off, out)


def test_jitter_changes_pixels_and_stays_in_range() -> None:
    x = _pixels(16)
    out = BatchPhotometric(AugmentPolicy(color_jitter=0.4, color_jitter_prob=1.0))(
        x, torch.Generator().manual_seed(0))
    pixels = _unnormalize(out)
    assert pixels.min() >= -1e-3 and pixels.max() <= 255.0 + 1e-3
    changed = (pixels - x.float()).abs().flatten(1).amax(1) > 1.0
    assert changed.all()


def test_deterministic_for_a_seed_and_different_across_seeds() -> None:
    x = _pixels(8)
    aug = BatchPhotometric(AugmentPolicy(grayscale_prob=0.3, blur_prob=0.5, solarize_prob=0.3))
    a = aug(x, torch.Generator().manual_seed(5))
    b = aug(x, torch.Generator().manual_seed(5))
    c = aug(x, torch.Generator().manual_seed(6))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)


def test_grayscale_solarize_and_blur_semantics() -> None:
    x = _pixels(4)
    gray = _unnormalize(BatchPhotometric(AugmentPolicy(color_jitter=0.0, grayscale_prob=1.0))(x))
    torch.testing.assert_close(gray[:, 0], gray[:, 1], atol=1e-3, rtol=0)
    torch.testing.assert_close(gray[:, 1], gray[:, 2], atol=1e-3, rtol=0)

    solar = _unnormalize(BatchPhotometric(AugmentPolicy(color_jitter=0.0, solarize_prob=1.0))(x))
    expected = torch.where(x >= 128, 255 - x, x).float()
    torch.testing.assert_close(solar, expected, atol=1e-3, rtol=0)

    flat = torch.full((2, 3, 16, 16), 77, dtype=torch.uint8)
    blurred = BatchPhotometric(AugmentPolicy(color_jitter=0.0, blur_prob=1.0))(flat)
    torch.testing.assert_close(_unnormalize(blurred), flat.float(), atol=1e-3, rtol=0)
    # sigma is in pixels at 224 px and scales with the crop: 14 at 224 is 2 px at 32.
    noisy = BatchPhotometric(AugmentPolicy(color_jitter=0.0, blur_prob=1.0, blur_sigma=(14, 14)))(
        _pixels(2, 32))
    assert _unnormalize(noisy).std() < _pixels(2, 32).float().std() * 0.6


def test_saturation_matrix_keeps_gray_and_zero_saturation_is_gray() -> None:
    matrices = photometric._saturation_matrices(torch.tensor([0.0, 0.5, 1.7]))
    weights = torch.tensor(photometric._GRAY_WEIGHTS)
    torch.testing.assert_close(weights @ matrices, weights.expand(3, 3))
    rgb = torch.tensor([200.0, 10.0, 90.0])
    desaturated = matrices[0] @ rgb
    torch.testing.assert_close(desaturated, (weights @ rgb).expand(3))


def test_hue_rotation_by_a_full_turn_is_identity() -> None:
    matrices = photometric._hue_matrices(torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(matrices, torch.eye(3).expand(2, 3, 3), atol=1e-5, rtol=0)


def test_chunked_cpu_path_matches_one_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    x = _pixels(7, 24)
    aug = BatchPhotometric(AugmentPolicy(color_jitter=0.8, grayscale_prob=0.3, blur_prob=0.5,
                                         solarize_prob=0.3))
    whole = aug(x, torch.Generator().manual_seed(1))
    monkeypatch.setattr(photometric, "_CHUNK_ELEMENTS", 1)  # one image per chunk
    chunked = aug(x, torch.Generator().manual_seed(1))
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=0)


def test_empty_batch() -> None:
    out = BatchPhotometric(AugmentPolicy())(torch.zeros(0, 3, 8, 8, dtype=torch.uint8))
    assert out.shape == (0, 3, 8, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_for_a_seed() -> None:
    x = _pixels(8, 32)
    aug = BatchPhotometric(AugmentPolicy(grayscale_prob=0.3, blur_prob=0.5, solarize_prob=0.3))
    cpu = aug(x, torch.Generator().manual_seed(3))
    gpu = aug(x.cuda(), torch.Generator().manual_seed(3))
    assert gpu.is_cuda
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)
