"""The 2-D toy densities of the normalizing-flow literature, with exact samplers and densities.

Six targets in the style of FFJORD's toy suite, each drawn from its generative story (so
the sampler is exact) and each with its log-density, in closed form or as a 1-D integral
evaluated by Gauss-Legendre quadrature (pinwheel: a 1-D root search):

- ``checkerboard``: uniform on 8 of the 16 squares of side 2 in [-4, 4]^2; density 1/32
  on them (entropy ``log 32``).
- ``pinwheel``: 5 arms, ``x = 2 R(2 pi l / 5 + exp(f_1) / 4) f`` with
  ``f ~ N((1, 0), diag(0.3^2, 0.1^2))``, R(a) the rotation by a; density by the change of
  variables ``f -> x``, the pre-images found by a root search on the polar angle of f.
- ``spirals``: two arms ``+-(c(t) + b) / 3 + e`` with ``c(t) = t (-cos t, sin t)``,
  ``t = 3 pi sqrt(u)``, ``b ~ U[0, 1/2]^2``, ``e ~ N(0, 0.1^2 I)``; density by quadrature
  over t (the box and the noise in closed form).
- ``rings``: 4 equally likely circles of radii 0.75, 1.5, 2.25 and 3, uniform angle, noise
  ``N(0, 0.08^2 I)``; closed-form density (Bessel ``I_0``).
- ``8gaussians``: 8 equally likely ``N(m_k, 0.354^2 I)``, ``m_k`` on the circle of radius
  2.83; closed form.
- ``moons``: [`two_moons`][pyro_cwm.data.two_moons] (noise 0.1), then ``2 x + (-1, -0.2)``;
  density by quadrature over the angle.

Every sampler takes ``(num_points, seed)`` and draws with its own ``torch.Generator``;
every log-density takes points (..., 2) and returns (...,), computed in float64 and
returned in the points' dtype.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pyro_cwm.data.toy import ring_of_gaussians, two_moons
from pyro_cwm.nn.checks import check_positive_int

_LOG_2PI = math.log(2 * math.pi)


def _generator(seed: int | None) -> torch.Generator:
    return torch.Generator().manual_seed(seed if seed is not None else torch.seed())


def _check_points(x: Tensor) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != 2:
        raise ValueError(f"x must have shape (..., 2), got {tuple(x.shape)}")
    return x.double()


@functools.cache
def _gauss_legendre(num: int, low: float, high: float) -> tuple[Tensor, Tensor]:
    """Nodes and weights of the ``num``-point Gauss-Legendre rule on [low, high] (cached)."""
    nodes, weights = np.polynomial.legendre.leggauss(num)
    half = (high - low) / 2
    return torch.from_numpy(low + half * (nodes + 1)), torch.from_numpy(half * weights)


def _chunked(fn: Callable[[Tensor], Tensor], x: Tensor, chunk: int = 2048) -> Tensor:
    flat = x.reshape(-1, 2)
    out = torch.cat([fn(part) for part in flat.split(chunk)]) if flat.shape[0] else flat[:, 0]
    return out.reshape(x.shape[:-1])


def _mixture_over_curve(
    y: Tensor,
    centre: Tensor,
    log_weight: Tensor,
    log_kernel: Callable[[Tensor], Tensor],
    cutoff: float,
) -> Tensor:
    """``log sum_m exp(log_weight_m + log_kernel(y - centre_m))`` for points y (N, 2).

    A point's sum leaves out the quadrature nodes ``centre`` (M, 2) farther from it than
    ``cutoff`` plus its distance to the nearest node: their terms are negligible (below
    exp(-30) of the nearest ones for the kernels here).
    """
    sq = (y * y).sum(-1, keepdim=True) - 2 * y @ centre.T + (centre * centre).sum(-1)
    dist = sq.clamp_min(0).sqrt()
    near = dist < dist.min(-1, keepdim=True).values + cutoff
    point, node = near.nonzero(as_tuple=True)
    terms = log_weight[node] + log_kernel(y[point] - centre[node])
    top = torch.full((y.shape[0],), -math.inf, dtype=y.dtype)
    top = top.scatter_reduce(0, point, terms, "amax")
    total = torch.zeros_like(top).index_add_(0, point, (terms - top[point]).exp())
    return total.log() + top


# --- checkerboard -----------------------------------------------------------------------


def checkerboard(num_points: int, seed: int | None = None) -> Tensor:
    """Uniform on the 8 dark squares (side 2) of a 4 x 4 checkerboard on [-4, 4]^2: (N, 2)."""
    check_positive_int("num_points", num_points)
    g = _generator(seed)
    x1 = 4 * torch.rand(num_points, generator=g) - 2
    row = torch.randint(2, (num_points,), generator=g)
    x2 = torch.rand(num_points, generator=g) - 2 * row + torch.floor(x1) % 2
    return 2 * torch.stack((x1, x2), -1)


def checkerboard_log_prob(x: Tensor) -> Tensor:
    """``-log 32`` on the dark squares, ``-inf`` elsewhere: shape ``x.shape[:-1]``."""
    y = _check_points(x) / 2
    inside = (y.abs() < 2).all(-1)
    dark = (torch.floor(y[..., 0]) + torch.floor(y[..., 1])) % 2 == 0
    out = torch.full(y.shape[:-1], -math.inf, dtype=torch.float64)
    return out.masked_fill(inside & dark, -math.log(32)).to(x.dtype)


# --- 8 Gaussians ------------------------------------------------------------------------

_EIGHT_RADIUS, _EIGHT_SCALE = 4 / 1.414, 0.5 / 1.414


def eight_gaussians(num_points: int, seed: int | None = None) -> Tensor:
    """8 equally likely isotropic Gaussians (sd 0.354) on the circle of radius 2.83: (N, 2)."""
    return ring_of_gaussians(num_points, 8, _EIGHT_RADIUS, _EIGHT_SCALE, seed=seed)


def eight_gaussians_log_prob(x: Tensor) -> Tensor:
    """Exact log-density of [`eight_gaussians`][pyro_cwm.data.eight_gaussians]."""
    y = _check_points(x)
    angle = 2 * math.pi * torch.arange(8, dtype=torch.float64) / 8
    centers = _EIGHT_RADIUS * torch.stack((angle.cos(), angle.sin()), -1)
    sq = ((y.unsqueeze(-2) - centers) ** 2).sum(-1)
    log_k = -sq / (2 * _EIGHT_SCALE**2) - _LOG_2PI - 2 * math.log(_EIGHT_SCALE)
    return (torch.logsumexp(log_k, -1) - math.log(8)).to(x.dtype)


# --- rings ------------------------------------------------------------------------------

_RING_RADII, _RING_NOISE = (0.75, 1.5, 2.25, 3.0), 0.08


def rings(num_points: int, seed: int | None = None) -> Tensor:
    """4 equally likely concentric circles (radii 0.75 to 3), noise sd 0.08: (N, 2)."""
    check_positive_int("num_points", num_points)
    g = _generator(seed)
    radius = torch.tensor(_RING_RADII)[torch.randint(4, (num_points,), generator=g)]
    angle = 2 * math.pi * torch.rand(num_points, generator=g)
    points = radius.unsqueeze(-1) * torch.stack((angle.cos(), angle.sin()), -1)
    return points + _RING_NOISE * torch.randn(num_points, 2, generator=g)


def rings_log_prob(x: Tensor) -> Tensor:
    """Exact log-density of [`rings`][pyro_cwm.data.rings].

    A circle of radius R blurred by N(0, s^2 I) has density
    ``exp(-(r^2 + R^2) / (2 s^2)) I_0(r R / s^2) / (2 pi s^2)`` at distance r from the centre.
    """
    r = _check_points(x).norm(dim=-1).unsqueeze(-1)
    radii, s2 = torch.tensor(_RING_RADII, dtype=torch.float64), _RING_NOISE**2
    arg = r * radii / s2
    # log I_0(a) = log i0e(a) + a, stable for large a.
    log_k = (
        -((r - radii) ** 2) / (2 * s2) + torch.special.i0e(arg).log() - math.log(2 * math.pi * s2)
    )
    return (torch.logsumexp(log_k, -1) - math.log(4)).to(x.dtype)


# --- two moons --------------------------------------------------------------------------

_MOONS_NOISE = 0.1


def moons(num_points: int, seed: int | None = None) -> Tensor:
    """[`two_moons`][pyro_cwm.data.two_moons] (noise 0.1) scaled by 2, shifted by (-1, -0.2)."""
    points = two_moons(num_points, noise=_MOONS_NOISE, seed=seed)
    return 2 * points + torch.tensor([-1.0, -0.2])


def _moons_log_prob(y: Tensor) -> Tensor:
    angle, weight = _gauss_legendre(512, 0.0, math.pi)
    c, s = angle.cos(), angle.sin()
    upper = torch.stack((2 * c - 1, 2 * s - 0.2), -1)
    lower = torch.stack((1 - 2 * c, 0.8 - 2 * s), -1)
    sd = 2 * _MOONS_NOISE
    log_weight = (weight / (2 * math.pi)).log().repeat(2)

    def log_kernel(diff: Tensor) -> Tensor:
        return -(diff**2).sum(-1) / (2 * sd**2) - _LOG_2PI - 2 * math.log(sd)

    return _mixture_over_curve(y, torch.cat((upper, lower)), log_weight, log_kernel, 8 * sd)


def moons_log_prob(x: Tensor) -> Tensor:
    """Log-density of [`moons`][pyro_cwm.data.moons]: the angle integrated out by
    512-point Gauss-Legendre quadrature (relative error below 1e-8 within the data's range)."""
    return _chunked(_moons_log_prob, _check_points(x)).to(x.dtype)


# --- two spirals ------------------------------------------------------------------------

_SPIRAL_TURN, _SPIRAL_NOISE, _SPIRAL_BOX = 3 * math.pi, 0.1, 0.5


def spirals(num_points: int, seed: int | None = None) -> Tensor:
    """Two interleaved spiral arms (1.5 turns each, sd 0.1 noise): (N, 2)."""
    check_positive_int("num_points", num_points)
    g = _generator(seed)
    t = _SPIRAL_TURN * torch.rand(num_points, 1, generator=g).sqrt()
    arm = torch.cat((-torch.cos(t) * t, torch.sin(t) * t), -1)
    arm = arm + _SPIRAL_BOX * torch.rand(num_points, 2, generator=g)
    sign = 1 - 2 * torch.randint(2, (num_points, 1), generator=g)
    return sign * arm / 3 + _SPIRAL_NOISE * torch.randn(num_points, 2, generator=g)


def _log_box_normal(x: Tensor, low: Tensor, width: float, sd: float) -> Tensor:
    """log density of U[low, low + width] + N(0, sd^2) at x (elementwise)."""
    a, b = (x - low - width) / sd, (x - low) / sd
    # Phi(b) - Phi(a), with the tails computed on the side where they do not cancel.
    upper = torch.special.ndtr(-a) - torch.special.ndtr(-b)
    lower = torch.special.ndtr(b) - torch.special.ndtr(a)
    diff = torch.where(a > 0, upper, lower).clamp_min(1e-300)
    return diff.log() - math.log(width)


def _spirals_log_prob(y: Tensor) -> Tensor:
    t, weight = _gauss_legendre(1024, 0.0, _SPIRAL_TURN)
    log_weight = torch.log(t / _SPIRAL_TURN**2 * weight).repeat(2)  # p(t) dt / 2 per arm
    arm = torch.stack((-torch.cos(t) * t, torch.sin(t) * t), -1) / 3
    box = _SPIRAL_BOX / 3
    # The second arm is the first one reflected through the origin: y on it is -y on the
    # first, so the box U[c, c + box] becomes U[-c - box, -c].
    low = torch.cat((arm, -arm - box))

    def log_kernel(diff: Tensor) -> Tensor:
        return _log_box_normal(diff, torch.zeros(()), box, _SPIRAL_NOISE).sum(-1)

    return _mixture_over_curve(
        y, low + box / 2, log_weight, lambda d: log_kernel(d + box / 2), box + 8 * _SPIRAL_NOISE
    )


def spirals_log_prob(x: Tensor) -> Tensor:
    """Log-density of [`spirals`][pyro_cwm.data.spirals]: the arm parameter t integrated out
    by 1024-point Gauss-Legendre quadrature, the box and the noise in closed form."""
    return _chunked(_spirals_log_prob, _check_points(x)).to(x.dtype)


# --- pinwheel ---------------------------------------------------------------------------

_PIN_ARMS, _PIN_RADIAL, _PIN_TANGENTIAL, _PIN_RATE = 5, 0.3, 0.1, 0.25


def pinwheel(num_points: int, seed: int | None = None) -> Tensor:
    """5 curved arms: ``x = 2 R(2 pi l / 5 + exp(f_1) / 4) f``, ``f ~ N((1, 0),
    diag(0.3^2, 0.1^2))``, l uniform on 0..4, R(a) the rotation by a: (N, 2)."""
    check_positive_int("num_points", num_points)
    g = _generator(seed)
    f = torch.randn(num_points, 2, generator=g) * torch.tensor([_PIN_RADIAL, _PIN_TANGENTIAL])
    f[:, 0] += 1
    arm = torch.randint(_PIN_ARMS, (num_points,), generator=g)
    angle = 2 * math.pi * arm / _PIN_ARMS + _PIN_RATE * f[:, 0].exp()
    c, s = angle.cos(), angle.sin()
    return 2 * torch.stack((c * f[:, 0] - s * f[:, 1], s * f[:, 0] + c * f[:, 1]), -1)


def _wrap(a: Tensor) -> Tensor:
    return torch.remainder(a + math.pi, 2 * math.pi) - math.pi


def _pinwheel_log_prob(y: Tensor, grid: int = 241) -> Tensor:
    # With f = rho (cos b, sin b), y / 2 = rho (cos psi, sin psi) needs
    # h(b) = b + phi(rho cos b) = psi - 2 pi l / 5 (mod 2 pi), phi(u) = exp(u) / 4, and
    # |det dy/df| = 4 |1 - phi'(f_1) f_2|. Roots are bracketed on a grid of b and refined
    # by Newton's method, only in the brackets that hold one.
    rho = (y.norm(dim=-1) / 2).clamp_min(1e-12)
    psi = torch.atan2(y[:, 1], y[:, 0])
    arms = 2 * math.pi * torch.arange(_PIN_ARMS, dtype=torch.float64) / _PIN_ARMS
    shift = psi[:, None] - arms  # (N, arms): h(b) must equal it mod 2 pi
    b = torch.linspace(0, 2 * math.pi, grid, dtype=torch.float64)

    def residual(beta: Tensor, r: Tensor, c: Tensor) -> Tensor:
        return _wrap(beta + _PIN_RATE * torch.exp(r * beta.cos()) - c)

    def slope(beta: Tensor, r: Tensor) -> Tensor:
        return 1 - _PIN_RATE * torch.exp(r * beta.cos()) * r * beta.sin()

    res = residual(b, rho[:, None, None], shift[..., None])  # (N, arms, grid)
    lo, hi = res[..., :-1], res[..., 1:]
    bracket = (lo * hi <= 0) & ((hi - lo).abs() < math.pi) & (lo != hi)
    point, arm, cell = bracket.nonzero(as_tuple=True)
    lo, hi = lo[point, arm, cell], hi[point, arm, cell]
    r, c = rho[point], shift[point, arm]
    beta = b[cell] + (b[1] - b[0]) * lo / (lo - hi)
    for _ in range(4):
        beta = beta - residual(beta, r, c) / slope(beta, r)
    f1, f2 = r * beta.cos(), r * beta.sin()
    log_f = (
        -((f1 - 1) ** 2) / (2 * _PIN_RADIAL**2)
        - f2**2 / (2 * _PIN_TANGENTIAL**2)
        - _LOG_2PI
        - math.log(_PIN_RADIAL * _PIN_TANGENTIAL)
    )
    dens = torch.exp(log_f - math.log(4) - slope(beta, r).abs().log())
    total = torch.zeros(y.shape[0], dtype=torch.float64).index_add_(0, point, dens)
    return total.log() - math.log(_PIN_ARMS)


def pinwheel_log_prob(x: Tensor) -> Tensor:
    """Log-density of [`pinwheel`][pyro_cwm.data.pinwheel] by the change of variables
    ``f -> x``, summed over the arms and the pre-images (found on a grid of the polar angle
    of f and refined by Newton's method)."""
    return _chunked(_pinwheel_log_prob, _check_points(x), chunk=512).to(x.dtype)


# --- the registry -----------------------------------------------------------------------


@dataclass(frozen=True)
class ToyDensity:
    """A 2-D toy target: an exact sampler, its log-density and a window to draw it in.

    Attributes:
        name: the key in [`TOY_DENSITIES`][pyro_cwm.data.TOY_DENSITIES].
        sample: ``(num_points, seed) -> (N, 2)``.
        log_prob: ``(..., 2) -> (...)``, exact (closed form or quadrature).
        bounds: the square ``[low, high]^2`` that holds nearly all the mass.
    """

    name: str
    sample: Callable[..., Tensor]
    log_prob: Callable[[Tensor], Tensor]
    bounds: tuple[float, float] = (-4.0, 4.0)


TOY_DENSITIES: dict[str, ToyDensity] = {
    t.name: t
    for t in (
        ToyDensity("checkerboard", checkerboard, checkerboard_log_prob),
        ToyDensity("pinwheel", pinwheel, pinwheel_log_prob),
        ToyDensity("spirals", spirals, spirals_log_prob),
        ToyDensity("rings", rings, rings_log_prob, (-3.5, 3.5)),
        ToyDensity("8gaussians", eight_gaussians, eight_gaussians_log_prob),
        ToyDensity("moons", moons, moons_log_prob),
    )
}


def toy_density(name: str) -> ToyDensity:
    """The toy target ``name`` (a key of [`TOY_DENSITIES`][pyro_cwm.data.TOY_DENSITIES]).

    Raises:
        ValueError: if ``name`` is unknown.
    """
    if name not in TOY_DENSITIES:
        raise ValueError(f"toy must be one of {sorted(TOY_DENSITIES)}, got {name!r}")
    return TOY_DENSITIES[name]
