"""Losses and collapse diagnostics for H-JEPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def prediction_loss(pred: Tensor, target: Tensor, kind: str = "smooth_l1", weight: Tensor | None = None) -> Tensor:
    """Mean per-token regression loss on real target tokens.

    Args:
        pred, target: (N, T, D).
        kind: ``smooth_l1`` (I-JEPA) or ``mse``.
        weight: optional (N, T) 0/1 validity mask; masked tokens do not count at all.
    """
    if kind == "smooth_l1":
        per_elem = F.smooth_l1_loss(pred.float(), target.float(), reduction="none")
    elif kind == "mse":
        per_elem = F.mse_loss(pred.float(), target.float(), reduction="none")
    else:
        raise ValueError(f"unknown loss {kind!r}; use smooth_l1 or mse")
    per_token = per_elem.mean(dim=-1)
    if weight is None:
        return per_token.mean()
    weight = weight.float()
    return (per_token * weight).sum() / weight.sum().clamp_min(1.0)


def vicreg_loss(a: Tensor, b: Tensor, inv: float = 25.0, var: float = 25.0, cov: float = 1.0) -> Tensor:
    """VICReg (Bardes et al., 2022) between two (N, D) embeddings of the same images."""
    a, b = a.float(), b.float()
    invariance = F.mse_loss(a, b)

    def variance_and_covariance(z: Tensor) -> tuple[Tensor, Tensor]:
        z = z - z.mean(dim=0)
        std = torch.sqrt(z.var(dim=0) + 1e-4)
        n, d = z.shape
        c = (z.T @ z) / max(n - 1, 1)
        off_diagonal = c - torch.diag(torch.diag(c))
        return F.relu(1.0 - std).mean(), off_diagonal.pow(2).sum() / d

    var_a, cov_a = variance_and_covariance(a)
    var_b, cov_b = variance_and_covariance(b)
    return inv * invariance + var * (var_a + var_b) / 2 + cov * (cov_a + cov_b)


def sigreg_loss(z: Tensor, num_slices: int = 256, t_max: float = 3.0, num_knots: int = 17) -> Tensor:
    """SIGReg (LeJEPA, Balestriero & LeCun, 2025): pulls (N, D) embeddings towards an isotropic
    standard Gaussian, the distribution the paper shows minimises downstream risk.

    The embeddings are projected on ``num_slices`` random unit directions (fresh every call,
    from the global RNG the engine seeds per step); each 1-D projection is scored by the
    Epps-Pulley statistic: the squared distance between its empirical characteristic function
    and the standard normal's, ``exp(-t^2 / 2)``, integrated over ``t`` in ``[-t_max, t_max]``
    with the same Gaussian as weight (trapezoid rule on ``num_knots`` points of ``[0, t_max]``:
    the integrand is even). Scaled by N, as the statistic is; the loss is its mean over slices.
    One view suffices, and its cost is one (N, D) x (D, slices) product.
    """
    z = z.float()
    directions = torch.randn(z.shape[1], num_slices, device=z.device)
    projected = z @ (directions / directions.norm(dim=0, keepdim=True))  # (N, slices)
    t = torch.linspace(0.0, t_max, num_knots, device=z.device)
    gaussian = torch.exp(-0.5 * t**2)
    trapezoid = torch.full_like(t, t_max / (num_knots - 1))
    trapezoid[[0, -1]] /= 2
    angles = projected.unsqueeze(-1) * t  # (N, slices, knots)
    gap = (angles.cos().mean(0) - gaussian) ** 2 + angles.sin().mean(0) ** 2
    statistic = (gap * (2 * trapezoid * gaussian)).sum(-1) * z.shape[0]
    return statistic.mean()


@torch.no_grad()
def collapse_statistics(embeddings: Tensor) -> dict[str, Tensor]:
    """Per-dimension std (of L2-normalised embeddings) and effective rank (Roy & Vetterli, 2007),
    as 0-d tensors on the embeddings' device (the training loop reads them when it logs).

    A collapsing encoder shows std -> 0 and effective rank -> 1.
    """
    z = F.normalize(embeddings.float(), dim=-1)
    std = z.std(dim=0).mean()
    centered = z - z.mean(dim=0)
    singular = torch.linalg.svdvals(centered)
    p = singular / singular.sum().clamp_min(1e-12)
    entropy = -(p * torch.log(p.clamp_min(1e-12))).sum()
    return {"collapse/std": std, "collapse/effective_rank": torch.exp(entropy)}


def collapse_metrics(embeddings: Tensor) -> dict[str, float]:
    """:func:`collapse_statistics` as floats."""
    return {name: float(value) for name, value in collapse_statistics(embeddings).items()}
