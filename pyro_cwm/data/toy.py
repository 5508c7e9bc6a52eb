"""Small synthetic data sets for examples and tests."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from pyro_cwm.nn.checks import check_positive_int


def _generator(seed: int | None) -> torch.Generator:
    return torch.Generator().manual_seed(seed if seed is not None else torch.seed())


def two_moons(
    num_points: int, noise: float = 0.1, seed: int | None = None, return_labels: bool = False
) -> Tensor | tuple[Tensor, Tensor]:
    """Two interleaved half circles in 2-D with Gaussian noise of sd ``noise``: (N, 2).

    With ``return_labels``, also the moon of every point (N,): 1 upper, 0 lower.
    """
    check_positive_int("num_points", num_points)
    g = _generator(seed)
    upper = torch.rand(num_points, generator=g) < 0.5
    angle = math.pi * torch.rand(num_points, generator=g)
    x = torch.where(upper, torch.cos(angle), 1 - torch.cos(angle))
    y = torch.where(upper, torch.sin(angle), 0.5 - torch.sin(angle))
    points = torch.stack((x, y), -1) + noise * torch.randn(num_points, 2, generator=g)
    return (points, upper.long()) if return_labels else points


def ring_of_gaussians(
    num_points: int,
    num_modes: int = 8,
    radius: float = 4.0,
    scale: float = 0.3,
    seed: int | None = None,
) -> Tensor:
    """An equal-weight mixture of ``num_modes`` isotropic Gaussians on a circle: (N, 2)."""
    check_positive_int("num_points", num_points)
    check_positive_int("num_modes", num_modes)
    g = _generator(seed)
    k = torch.randint(num_modes, (num_points,), generator=g)
    angle = 2 * math.pi * k / num_modes
    centers = radius * torch.stack((torch.cos(angle), torch.sin(angle)), -1)
    return centers + scale * torch.randn(num_points, 2, generator=g)


def inverse_sine(
    num_points: int = 512,
    noise: float = 0.5,
    uniform: bool = False,
    seed: int | None = None,
) -> tuple[Tensor, Tensor]:
    """The 1-D inverse problem of the seed MDN's example: predict y from x, (x, y) each (N, 1).

    ``y`` runs over [-1, 1] (an even grid, or uniform draws with ``uniform=True``) and
    ``x = 7 sin(5 y) + 0.5 y + noise * eps``, eps ~ N(0, 1). The forward map x(y) is not
    monotone, so p(y | x) has up to three modes for the same x: one Gaussian cannot fit
    it, a mixture of K = 3 can.

    Raises:
        ValueError: if ``num_points`` < 1 or ``noise`` < 0.
    """
    check_positive_int("num_points", num_points)
    if not noise >= 0:
        raise ValueError(f"noise must be >= 0, got {noise}")
    g = _generator(seed)
    if uniform:
        y = 2 * torch.rand(num_points, generator=g) - 1
    else:
        y = torch.linspace(-1, 1, num_points)
    x = 7 * torch.sin(5 * y) + 0.5 * y + noise * torch.randn(num_points, generator=g)
    return x.unsqueeze(-1), y.unsqueeze(-1)


EXAMPLES: dict[str, Callable[..., Tensor]] = {
    "moons": two_moons,
    "ring": ring_of_gaussians,
}


def make_example(name: str, num_points: int, seed: int | None = None) -> Tensor:
    """Draw ``num_points`` from the built-in example ``name`` (one of ``EXAMPLES``).

    Raises:
        ValueError: if ``name`` is unknown.
    """
    if name not in EXAMPLES:
        raise ValueError(f"example must be one of {sorted(EXAMPLES)}, got {name!r}")
    return EXAMPLES[name](num_points, seed=seed)


def two_planes(
    num_points: int = 200,
    seed: int = 42,
    *,
    noise: float = 5.0,
    squeeze: float = 0.8,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """MixtureLib's two-planes regression example: a mixture of two linear models.

    ``x ~ N(0, I_2)``; the first half of the points has its second feature scaled by
    ``squeeze`` and follows ``y = x^T (10, 0)``, the second half its first feature and
    ``y = x^T (0, 30)``; plus ``N(0, noise^2)``. Drawn with ``numpy.random.RandomState(seed)``
    in MixtureLib's order, so ``seed=42`` gives its documented data set.

    Returns:
        ``X`` (N, 2), ``Y`` (N,) and the true weights (2, 2) (one row per plane), in
        ``dtype`` (default: torch's default dtype).

    Raises:
        TypeError, ValueError: if ``num_points`` is not an int >= 2.
    """
    import numpy as np

    check_positive_int("num_points", num_points)
    if num_points < 2:
        raise ValueError(f"num_points must be >= 2, got {num_points}")
    rng = np.random.RandomState(seed)
    half = num_points // 2
    x = rng.randn(num_points, 2)
    x[:half, 1] *= squeeze
    x[half:, 0] *= squeeze
    weights = np.array([[10.0, 0.0], [0.0, 30.0]])
    y = np.concatenate([x[:half] @ weights[0], x[half:] @ weights[1]])
    y = y + noise * rng.randn(num_points, 1)[:, 0]
    dtype = dtype or torch.get_default_dtype()
    return tuple(torch.as_tensor(a, dtype=dtype) for a in (x, y, weights))
