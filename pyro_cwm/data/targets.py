"""Analytic posterior-like targets with exact samplers, written as Pyro models.

Each target is a normalized density on R^d (so log Z = 0) with an exact sampler; its Pyro
model has one latent site ``"x"`` of event shape (d,) drawn from a wide N(0, 10^2) base,
and a ``pyro.factor`` that swaps the base's log-density for the target's, so that the
joint density is exactly the target (the base only gives initializers something to draw).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor


@dataclass
class Target:
    """A normalized target density on R^dim with an exact sampler.

    Attributes:
        name: short name.
        dim: dimension d.
        log_prob: log-density, (..., d) -> (...).
        sample: exact sampler, (num, generator) -> (num, d).
        modes: centers of well-separated modes (K, d), or None; each mode's share is
            ``mode_weights`` (equal by default).
    """

    name: str
    dim: int
    log_prob: Callable[[Tensor], Tensor]
    sample: Callable[[int, torch.Generator], Tensor]
    modes: Tensor | None = None
    mode_weights: Tensor | None = None

    def model(self) -> None:
        """The Pyro model: joint density of ``x`` equal to the target."""
        base = dist.Normal(0.0, 10.0).expand([self.dim]).to_event(1)
        x = pyro.sample("x", base)
        pyro.factor("target", self.log_prob(x) - base.log_prob(x))


def _mixture_log_prob(
    x: Tensor, centers: Tensor, scale: float | Tensor, weights: Tensor | None = None
) -> Tensor:
    """Mixture of isotropic Gaussians: ``scale`` one for all or (K,), ``weights`` (K,)."""
    scales = torch.as_tensor(scale, dtype=centers.dtype).expand(centers.shape[0])
    components = dist.Normal(centers, scales[:, None]).to_event(1)
    if weights is None:
        weights = torch.full((centers.shape[0],), 1.0 / centers.shape[0])
    return dist.MixtureSameFamily(dist.Categorical(weights), components).log_prob(x)


def _mixture_sample(
    num: int,
    g: torch.Generator,
    centers: Tensor,
    scale: float | Tensor,
    weights: Tensor | None = None,
) -> Tensor:
    scales = torch.as_tensor(scale, dtype=centers.dtype).expand(centers.shape[0])
    if weights is None:
        k = torch.randint(centers.shape[0], (num,), generator=g)
    else:
        k = torch.multinomial(weights, num, replacement=True, generator=g)
    return centers[k] + scales[k, None] * torch.randn(num, centers.shape[1], generator=g)


def ring(num_modes: int = 8, radius: float = 4.0, scale: float = 0.3) -> Target:
    """Equal mixture of ``num_modes`` isotropic Gaussians on a circle in 2-D."""
    angle = 2 * math.pi * torch.arange(num_modes) / num_modes
    centers = radius * torch.stack((angle.cos(), angle.sin()), -1)
    return Target(
        "ring",
        2,
        lambda x: _mixture_log_prob(x, centers, scale),
        lambda n, g: _mixture_sample(n, g, centers, scale),
        modes=centers,
    )


def two_gaussians(
    dim: int = 10,
    offset: float = 3.0,
    weights: tuple[float, float] = (0.5, 0.5),
    scales: tuple[float, float] = (1.0, 1.0),
) -> Target:
    """Mixture of N(-offset 1, scales[0]^2 I) and N(offset 1, scales[1]^2 I) in ``dim``
    dimensions with ``weights`` (equal by default)."""
    centers = torch.stack((torch.full((dim,), -offset), torch.full((dim,), offset)))
    w, sd = torch.tensor(weights), torch.tensor(scales)
    equal = weights == (0.5, 0.5) and scales == (1.0, 1.0)
    return Target(
        f"two-gaussians-{dim}d" if equal else f"two-gaussians-unequal-{dim}d",
        dim,
        lambda x: _mixture_log_prob(x, centers, sd, w),
        lambda n, g: _mixture_sample(n, g, centers, sd, w),
        modes=centers,
        mode_weights=w,
    )


def two_unequal_gaussians() -> Target:
    """Two isotropic Gaussians in 10-D with weights 0.7 / 0.3 and scales 1 / 0.71 (issue
    12's third case: each mode with its own share and width)."""
    return two_gaussians(10, 3.0, weights=(0.7, 0.3), scales=(1.0, 0.71))


def banana(curvature: float = 0.5, scale: float = 2.0) -> Target:
    """Twisted Gaussian: x1 ~ N(0, scale^2), x2 | x1 ~ N(curvature (x1^2 - scale^2), 1)."""

    def log_prob(x: Tensor) -> Tensor:
        x1, x2 = x[..., 0], x[..., 1]
        mean = curvature * (x1**2 - scale**2)
        return dist.Normal(0.0, scale).log_prob(x1) + dist.Normal(mean, 1.0).log_prob(x2)

    def sample(n: int, g: torch.Generator) -> Tensor:
        x1 = scale * torch.randn(n, generator=g)
        x2 = curvature * (x1**2 - scale**2) + torch.randn(n, generator=g)
        return torch.stack((x1, x2), -1)

    return Target("banana", 2, log_prob, sample)


def funnel(dim: int = 10, scale: float = 3.0) -> Target:
    """Neal's funnel: v ~ N(0, scale^2), x_i | v ~ N(0, exp(v / 2)^2), i = 1..dim-1."""

    def log_prob(x: Tensor) -> Tensor:
        v, rest = x[..., 0], x[..., 1:]
        return dist.Normal(0.0, scale).log_prob(v) + dist.Normal(
            0.0, (v / 2).exp()[..., None]
        ).log_prob(rest).sum(-1)

    def sample(n: int, g: torch.Generator) -> Tensor:
        v = scale * torch.randn(n, generator=g)
        rest = (v / 2).exp()[:, None] * torch.randn(n, dim - 1, generator=g)
        return torch.cat((v[:, None], rest), -1)

    return Target(f"funnel-{dim}d", dim, log_prob, sample)


def two_moons(
    radius: float = 2.0, width: float = 0.4, separation: float = 2.0, spread: float = 0.6
) -> Target:
    """The 'two moons' energy of Rezende & Mohamed (2015), normalized numerically.

    Unnormalized: exp(-((|x| - radius)/width)^2 / 2) (e^{-((x1-s)/spread)^2/2} +
    e^{-((x1+s)/spread)^2/2}). The normalizer is a fixed 2-D quadrature; the sampler is
    exact rejection sampling from a Gaussian envelope.
    """

    def unnormalized(x: Tensor) -> Tensor:
        ring_term = -0.5 * ((x.norm(dim=-1) - radius) / width) ** 2
        sides = torch.logaddexp(
            -0.5 * ((x[..., 0] - separation) / spread) ** 2,
            -0.5 * ((x[..., 0] + separation) / spread) ** 2,
        )
        return ring_term + sides

    grid = torch.linspace(-6, 6, 1201, dtype=torch.float64)
    mesh = torch.cartesian_prod(grid, grid)
    cell = (grid[1] - grid[0]) ** 2
    log_norm = (torch.logsumexp(unnormalized(mesh), 0) + cell.log()).item()
    envelope = dist.Normal(torch.zeros(2), torch.full((2,), 3.0)).to_event(1)
    # max over the grid of log(unnormalized / envelope) bounds the rejection ratio.
    log_bound = (unnormalized(mesh.float()) - envelope.log_prob(mesh.float())).max().item() + 0.1

    def sample(n: int, g: torch.Generator) -> Tensor:
        out = []
        count = 0
        while count < n:
            proposal = 3.0 * torch.randn(4 * n, 2, generator=g)
            log_ratio = unnormalized(proposal) - envelope.log_prob(proposal) - log_bound
            keep = torch.rand(4 * n, generator=g).log() < log_ratio
            out.append(proposal[keep])
            count += int(keep.sum())
        return torch.cat(out)[:n]

    centers = torch.tensor([[separation, 0.0], [-separation, 0.0]])
    return Target("two-moons", 2, lambda x: unnormalized(x) - log_norm, sample, modes=centers)


TARGETS: dict[str, Callable[[], Target]] = {
    "ring": ring,
    "two-moons": two_moons,
    "banana": banana,
    "funnel": funnel,
    "two-gaussians": two_gaussians,
    "two-gaussians-unequal": two_unequal_gaussians,
}
