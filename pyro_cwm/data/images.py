"""Images as 2-D densities: the pixel-uniform density of a greyscale image and the logit map."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.distributions import transforms

from pyro_cwm.nn.checks import check_positive_int


def pixel_density_sample(grey: np.ndarray, num_points: int, seed: int | None = None) -> Tensor:
    """Sample the density on [0, 1]^2 that is uniform in each pixel with mass ∝ its intensity.

    Args:
        grey: non-negative intensities, shape (rows, columns), row 0 at the top.
        num_points: number of draws.
        seed: random seed.

    Returns:
        Points (N, 2): first coordinate left to right, second bottom to top.

    Raises:
        ValueError: if ``grey`` is not 2-D, has negative or non-finite entries or sums to 0.
    """
    check_positive_int("num_points", num_points)
    grey = torch.as_tensor(np.asarray(grey, dtype=np.float64))
    if grey.dim() != 2:
        raise ValueError(f"grey must be 2-D (rows, columns), got shape {tuple(grey.shape)}")
    if not torch.isfinite(grey).all() or (grey < 0).any() or grey.sum() <= 0:
        raise ValueError("grey must be finite, non-negative and not all zero")
    rows, cols = grey.shape
    g = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
    pixel = torch.multinomial(
        grey.flatten() / grey.sum(), num_points, replacement=True, generator=g
    )
    u = torch.rand(num_points, 2, generator=g, dtype=torch.float64)
    x = (pixel % cols + u[:, 0]) / cols
    y = 1 - (pixel // cols + u[:, 1]) / rows
    return torch.stack((x, y), -1).to(torch.get_default_dtype())


class LogitTransform(transforms.ComposeTransform):
    """``y = logit(alpha + (1 - 2 alpha) x)``: maps [0, 1]^d onto R^d, as in the CWM paper.

    A ``torch.distributions`` transform: ``log_abs_det_jacobian`` gives the change of
    density between the two spaces (sum it over the last dim for vectors).
    """

    def __init__(self, alpha: float = 1e-2) -> None:
        if not 0 < alpha < 0.5:
            raise ValueError(f"alpha must be in (0, 0.5), got {alpha}")
        self.alpha = alpha
        super().__init__(
            [transforms.AffineTransform(alpha, 1 - 2 * alpha), transforms.SigmoidTransform().inv]
        )
