"""Sample-based comparisons of an approximation with reference draws."""

from __future__ import annotations

import torch
from torch import Tensor


def energy_distance(x: Tensor, y: Tensor) -> float:
    """Energy distance 2 E|X-Y| - E|X-X'| - E|Y-Y'| between samples (n, d) and (m, d).

    Zero iff the distributions agree; the V-statistic (diagonal terms included).
    """
    x, y = x.double(), y.double()
    return (
        2 * torch.cdist(x, y).mean() - torch.cdist(x, x).mean() - torch.cdist(y, y).mean()
    ).item()


def marginal_errors(approx: Tensor, reference: Tensor) -> tuple[float, float]:
    """Worst standardized error of the marginal means and worst ratio of marginal sds.

    Returns ``(max_i |mean_q - mean_p| / sd_p, max_i max(sd_q/sd_p, sd_p/sd_q))``.
    """
    sd_p = reference.std(0)
    mean_err = ((approx.mean(0) - reference.mean(0)).abs() / sd_p).max().item()
    ratio = approx.std(0) / sd_p
    return mean_err, torch.maximum(ratio, 1 / ratio).max().item()


def mode_shares(samples: Tensor, modes: Tensor) -> Tensor:
    """Share of ``samples`` (n, d) nearest to each of ``modes`` (K, d): shape (K,)."""
    nearest = torch.cdist(samples.double(), modes.double()).argmin(-1)
    return torch.bincount(nearest, minlength=modes.shape[0]).double() / samples.shape[0]


def worst_mode_share_error(samples: Tensor, modes: Tensor, weights: Tensor | None = None) -> float:
    """Largest relative error of a mode's share: max_k |share_k - w_k| / w_k."""
    if weights is None:
        weights = torch.full((modes.shape[0],), 1.0 / modes.shape[0], dtype=torch.float64)
    return ((mode_shares(samples, modes) - weights).abs() / weights).max().item()
