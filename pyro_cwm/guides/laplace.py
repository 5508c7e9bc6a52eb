"""Curvature of the model's log density at packed unconstrained points, for AutoCWM's start.

Exact Hessians of many points in one vectorized double-backward run, a saddle-free
Newton refinement of a start, and the Laplace preconditioner and component scales that
AutoCWM derives from them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import pyro
import torch
from torch import Tensor

LogJoint = Callable[[Tensor], Tensor]  # (n, d) -> (n,)

LOW_PRECISION = (torch.float16, torch.bfloat16, torch.float32)


def as_float64(value):
    """``value`` with every float16/bfloat16/float32 tensor in it (nested tuples, lists
    and dicts) converted to float64; anything else is returned as it is."""
    if torch.is_tensor(value):
        return value.double() if value.dtype in LOW_PRECISION else value
    if isinstance(value, (tuple, list)):
        return type(value)(as_float64(item) for item in value)
    if isinstance(value, dict):
        return {key: as_float64(item) for key, item in value.items()}
    return value


def float64_log_joint(
    make_log_joint: Callable[[tuple, dict], LogJoint], args: tuple, kwargs: dict, point: Tensor
) -> tuple[LogJoint, torch.dtype]:
    """The log joint in float64 where the model runs in it, for curvature and Newton steps.

    ``make_log_joint(args, kwargs)`` builds the log joint of the model on its arguments.
    Where ``point`` (d,) is float32 (or lower) the arguments' floating tensors are cast to
    float64 and the model is tried there at ``point``: its float32 log density on 10^3
    rows (about 1e3 nats) is resolved to 1e-4 nats and its gradients carry rounding
    errors of 1e3, while a posterior correlation of -0.998 needs a condition number of
    1e7 resolved (a regression on an uncentered covariate: Newton's method found no
    mode from 2 of 8 starts). Where the model fails in float64 (a matrix product with a
    float32 tensor that it holds itself) or is not finite there, the log joint stays in
    the model's dtype.

    Returns:
        ``(log_joint, dtype)``: a log joint and the dtype of the points it takes.
    """
    native = make_log_joint(args, kwargs)
    if point.dtype not in LOW_PRECISION:
        return native, point.dtype
    precise = make_log_joint(as_float64(args), as_float64(kwargs))
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = precise(point.double()[None])
    except (RuntimeError, ValueError, TypeError):
        return native, point.dtype
    if value.dtype != torch.float64 or not torch.isfinite(value).all():
        return native, point.dtype
    return precise, torch.float64


def hessian_vector_products(
    log_joint: LogJoint, points: Tensor, vectors: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Values (b,), gradients (b, d) and Hessian-vector products ``H(x_i) v_i`` (b, d) of
    ``log_joint`` at the rows x_i of ``points`` (b, d), v_i the rows of ``vectors`` (b, d),
    in one double-backward pass.

    ``log_joint`` must treat its rows independently (as ``unconstrained_log_joint`` does).
    """
    with torch.enable_grad():
        copies = points.detach().clone().requires_grad_(True)
        log_p = log_joint(copies)
        (grad,) = torch.autograd.grad(log_p.sum(), copies, create_graph=True)
        picked = (grad * vectors).sum()
        products = None
        if picked.requires_grad:  # else linear in x: no curvature
            (products,) = torch.autograd.grad(picked, copies, allow_unused=True)
    products = torch.zeros_like(copies) if products is None else products
    return log_p.detach(), grad.detach(), products.detach()


def log_joint_derivatives(log_joint: LogJoint, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Values (n,), gradients (n, d) and Hessians (n, d, d) of ``log_joint`` at u (n, d).

    ``log_joint`` must treat its rows independently (as ``unconstrained_log_joint``
    does). Each point is repeated d times; row i of the i-th copy's Hessian is the
    gradient of the i-th partial derivative, so one double-backward pass over n d points
    gives every Hessian exactly.
    """
    n, d = u.shape
    eye = torch.eye(d, dtype=u.dtype, device=u.device).repeat(n, 1)
    log_p, grad, hess = hessian_vector_products(log_joint, u.repeat_interleave(d, 0), eye)
    hess = hess.reshape(n, d, d)
    hess = 0.5 * (hess + hess.transpose(-1, -2))
    return log_p[::d], grad[::d], hess


def newton_refine(
    log_joint: LogJoint, u: Tensor, steps: int = 20, tol: float = 1e-6
) -> tuple[Tensor, bool]:
    """Climb to a mode of ``log_joint`` from u (d,) by saddle-free Newton steps.

    Each step is ``V diag(1/|lambda|) V^T grad`` (V, lambda: the eigenvectors and values
    of the negative Hessian, so negative curvature pushes uphill too), with a vectorized
    backtracking search over 30 halvings that keeps the longest step which increases the
    log density. It stops when the negative Hessian is positive definite and the Newton
    decrement ``grad^T P^{-1} grad / 2`` is below ``tol`` nats, or below the rounding
    resolution of the log density in its dtype (converged), when no step
    improves, or after ``steps`` steps.

    Returns:
        ``(u, converged)``: the refined point, and whether it is a (local) mode.
    """
    fractions = 0.5 ** torch.arange(30, dtype=u.dtype, device=u.device)
    for step_number in range(steps + 1):
        log_p, grad, hess = log_joint_derivatives(log_joint, u[None])
        if not (torch.isfinite(hess).all() and torch.isfinite(grad).all()):
            return u, False
        eigenvalues, vectors = torch.linalg.eigh(-hess[0])
        projected = vectors.T @ grad[0]
        # Nats closer to the mode than log_p's rounding cannot be resolved: in float32 a
        # log density of 1e4 (a regression on 10^4 points) has a resolution of 1e-3.
        resolution = 4 * torch.finfo(u.dtype).eps * log_p[0].abs().item()
        decrement = 0.5 * (projected**2 / eigenvalues).sum()
        if eigenvalues.min() > 0 and decrement < max(tol, resolution):
            return u, True
        if step_number == steps:
            return u, False
        # Floor |lambda| only at rounding level: kilpisjarvi's condition number is 1e12.
        info = torch.finfo(u.dtype)
        floor = (info.eps * eigenvalues.abs().max()).clamp(min=info.tiny)
        step = vectors @ (projected / eigenvalues.abs().clamp(min=floor))
        # Long trial steps may leave the support (exp underflows to 0): NaN, not an error.
        with torch.no_grad(), warnings.catch_warnings(), pyro.validation_enabled(False):
            warnings.simplefilter("ignore")
            trial = log_joint(u + fractions[:, None] * step)
        better = torch.isfinite(trial) & (trial > log_p[0])
        if not better.any():
            return u, False
        u = u + fractions[int(better.nonzero()[0])] * step
    return u, False


def laplace_preconditioner(precision: Tensor, floor: float = 0.1) -> Tensor:
    """The preconditioner ``A = V diag(s)`` of a negative Hessian ``P = V diag(lambda) V^T``.

    ``s_i = max(lambda_i^{-1/2}, floor)`` (1 where lambda_i <= 0): in ``y = A^{-1} x`` the
    principal axes of the Laplace approximation have unit width, so Adam's steps, of
    about the same size in every parameter, suit every direction, however correlated
    and however different in scale. Axes narrower than ``floor`` are not shrunk further:
    in a funnel's neck or a near-deterministic direction, a tiny unit would slow the
    parameters that must still move a long way.
    """
    eigenvalues, vectors = torch.linalg.eigh(precision)
    tiny = torch.finfo(precision.dtype).tiny
    stretch = torch.where(
        eigenvalues > 0, eigenvalues.clamp(min=tiny).rsqrt().clamp(min=floor), 1.0
    )
    return vectors * stretch


def secant_widths(
    log_joint: LogJoint,
    u: Tensor,
    matrix: Tensor,
    floor: float = 0.0,
    max_drop: float = 2.0,
    target_drop: float = 0.5,
    halvings: int = 40,
    chunk: int = 4096,
) -> Tensor:
    """Shrink the axes (columns) of a Laplace preconditioner where the log density falls
    much faster than its curvature at u (d,) predicts.

    Along a column a of ``matrix`` (a principal axis, as long as its Laplace width) a
    Gaussian's log density falls by the symmetric difference ``log p(u) - (log p(u + a) +
    log p(u - a)) / 2 = 1/2`` nat. Where the curvature at u vanishes but higher orders do
    not (a ridge whose top is flat to second order, as in the middle of a moon: the
    density falls as the fourth power), the Laplace width is far too wide, and so are the
    components started from it: hundreds of widths, and every Adam step in those
    coordinates moves a location by as much. Where the symmetric difference at a exceeds
    ``max_drop`` nats, the axis is shrunk by powers of sqrt(2) (up to ``halvings`` times)
    to the longest length at which it is at most ``target_drop``, but not below ``floor``.
    The symmetric difference cancels the linear term, so the check also holds away from a
    mode. Axes along which the density falls more slowly are kept.

    Returns:
        The preconditioner with its too-wide columns shortened (same shape as ``matrix``).
    """

    def symmetric_drop(center: Tensor, steps: Tensor) -> Tensor:
        """``log p(u) - (log p(u + s) + log p(u - s)) / 2`` for steps (m, d) -> (m,);
        +inf where a value is not finite."""
        points = torch.cat((u + steps, u - steps))
        with torch.no_grad(), warnings.catch_warnings(), pyro.validation_enabled(False):
            warnings.simplefilter("ignore")
            values = torch.cat([log_joint(part) for part in points.split(chunk)])
        plus, minus = values.chunk(2)
        drop = center - 0.5 * (plus + minus)
        return torch.where(torch.isfinite(drop), drop, torch.full_like(drop, math.inf))

    with torch.no_grad(), warnings.catch_warnings(), pyro.validation_enabled(False):
        warnings.simplefilter("ignore")
        center = log_joint(u[None])[0]
    if not torch.isfinite(center):
        return matrix
    axes = matrix.T  # (d, d): one axis per row
    too_wide = (symmetric_drop(center, axes) > max_drop).nonzero().flatten()
    if not len(too_wide):
        return matrix
    factors = 2.0 ** (-0.5 * torch.arange(1, halvings + 1, dtype=u.dtype, device=u.device))
    steps = factors[None, :, None] * axes[too_wide, None, :]  # (m, J, d)
    m, j, d = steps.shape
    drops = symmetric_drop(center, steps.reshape(m * j, d)).reshape(m, j)
    fits = drops <= target_drop
    # The longest length that fits (the shortest tried where none does).
    first = torch.where(
        fits.any(-1), fits.float().argmax(-1), torch.full_like(fits[:, 0], j - 1, dtype=torch.long)
    )
    lengths = axes[too_wide].norm(dim=-1)
    scale = torch.maximum(factors[first], floor / lengths.clamp(min=torch.finfo(u.dtype).tiny))
    matrix = matrix.clone()
    matrix[:, too_wide] = matrix[:, too_wide] * scale.clamp(max=1.0)
    return matrix


def laplace_scales(precision: Tensor, matrix: Tensor, default: float) -> Tensor:
    """Diagonal Gaussian scales (n, d) in the coordinates ``y = A^{-1} x`` from the negative
    Hessians ``precision`` (n, d, d): ``(A^T P A)_ii^{-1/2}``, at most 1 (the reverse-KL
    best diagonal Gaussian of the local Laplace approximation); ``default`` where the
    curvature is not positive."""
    diagonal = torch.einsum("ji,njk,ki->ni", matrix, precision, matrix)
    tiny = torch.finfo(precision.dtype).tiny
    scales = diagonal.clamp(min=tiny).rsqrt().clamp(max=1.0)
    return torch.where(diagonal > 0, scales, torch.full_like(scales, default))


def laplace_misfit(
    log_joint: LogJoint, mode: Tensor, precision: Tensor, num_draws: int = 256, chunk: int = 64
) -> float:
    """How far the log density is from its Laplace approximation at ``mode`` (d,): half
    the variance of ``log p(x) - log N(x; mode, precision^-1)`` over ``num_draws`` draws
    x of that Gaussian, in nats.

    It is zero for a Gaussian density and, for small departures, the second-order
    estimate of KL(N || p) up to the log normalizer; it grows where the widths change
    across the Gaussian's typical set (a funnel around a mode: gp_pois_regr's GP values,
    whose widths scale with the GP's amplitude, give tens to hundreds, the 2-D banana about
    200; the bench's regressions and Gaussian mixtures 0.01-0.3). It is an estimate from
    draws, heavy-tailed where the misfit is large. Draws use the global torch generator
    (``pyro.set_rng_seed``).

    ``log_joint`` sees at most ``chunk`` draws at a time (a model on much data holds one
    copy of it per draw).

    Returns:
        The misfit; ``math.inf`` where ``precision`` (d, d) is not positive definite or the
        log density is not finite at some draw.
    """
    chol, info = torch.linalg.cholesky_ex(precision)
    if info.item() != 0:
        return math.inf
    eps = torch.randn(num_draws, mode.shape[0], dtype=mode.dtype, device=mode.device)
    # x = mode + L^-T eps has covariance (L L^T)^-1 = precision^-1.
    x = mode + torch.linalg.solve_triangular(chol.mT, eps.unsqueeze(-1), upper=True).squeeze(-1)
    with torch.no_grad():
        ratio = torch.cat([log_joint(part) for part in x.split(chunk)]) + 0.5 * (eps**2).sum(-1)
    if not torch.isfinite(ratio).all():
        return math.inf
    return 0.5 * ratio.var().item()
