"""Losses: SIGReg scores distance from an isotropic Gaussian and its gradient undoes collapse."""

import torch

from hjepa_core.losses import sigreg_loss


def _sigreg(z: torch.Tensor) -> float:
    torch.manual_seed(0)  # the same random slices for every input compared
    return float(sigreg_loss(z))


def test_sigreg_is_small_for_a_standard_gaussian_and_large_otherwise():
    g = torch.Generator().manual_seed(0)
    gaussian = torch.randn(1024, 32, generator=g)
    calm = _sigreg(gaussian)
    # A true sample: the expected statistic is about 1 (the integral of (1 - exp(-t^2)) exp(-t^2 / 2)).
    assert calm < 3.0
    assert _sigreg(gaussian * 0.05) > 20 * calm  # nearly collapsed
    assert _sigreg(gaussian * 3.0) > 20 * calm  # too spread
    assert _sigreg(gaussian + 2.0) > 20 * calm  # off-centre
    low_rank = gaussian[:, :2] @ torch.randn(2, 32, generator=g) / 32**0.5
    assert _sigreg(low_rank) > 5 * calm  # anisotropic: a 2-D subspace


def test_sigreg_gradient_spreads_a_collapsed_embedding():
    g = torch.Generator().manual_seed(1)
    z = (0.01 * torch.randn(256, 16, generator=g)).requires_grad_()
    before = _sigreg(z.detach())
    optimizer = torch.optim.Adam([z], lr=0.05)
    torch.manual_seed(0)
    for _ in range(200):
        optimizer.zero_grad()
        sigreg_loss(z, num_slices=64).backward()
        optimizer.step()
    assert 0.7 < float(z.detach().std(0).mean()) < 1.3  # from 0.01 to about 1 in every dimension
    assert _sigreg(z.detach()) < 0.05 * before
