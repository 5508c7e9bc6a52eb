"""Curvature of the model's log density without a d x d matrix, for AutoCWM above
``laplace_max_dim``: Hessian-vector products in batches, a diagonal-plus-low-rank
inverse square root of the negative Hessian from a block Krylov space, and L-BFGS to
the mode.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import pyro
import torch
from torch import Tensor

from pyro_cwm.guides.laplace import LogJoint, hessian_vector_products
from pyro_cwm.nn.maps import low_rank_update


def negative_hessian_products(log_joint: LogJoint, u: Tensor, vectors: Tensor) -> Tensor:
    """``P v`` (b, d) for each row v of ``vectors`` (b, d), P the negative Hessian of
    ``log_joint`` at u (d,), in one double-backward pass over b copies of u."""
    return -hessian_vector_products(log_joint, u.expand(vectors.shape), vectors)[2]


@dataclass
class LowRankCurvature:
    """``A = diag(scale) (I + U diag(widths - 1) U^T)``, with ``A A^T`` about the inverse of
    the negative Hessian P: ``scale`` (d,) the widths off U, U (d, m) orthonormal and
    ``widths`` (m,) the widths along U relative to ``scale``.
    """

    scale: Tensor
    vectors: Tensor
    widths: Tensor
    positive: bool
    """Whether every Ritz value and the other directions' mean curvature are positive."""

    def floored(self, floor: float) -> LowRankCurvature:
        """The same with no width below ``floor`` and none along U below ``scale``: away
        from a mode the curvature is local, and narrow directions are not trusted."""
        return LowRankCurvature(
            self.scale.clamp(min=floor), self.vectors, self.widths.clamp(min=1.0), self.positive
        )

    def inverse_hessian(self, g: Tensor) -> Tensor:
        """``A A^T g`` for gradients g (..., d): the approximate Newton direction."""
        return self.scale * low_rank_update(self.scale * g, self.vectors, self.widths**2)


def low_rank_curvature(log_joint: LogJoint, u: Tensor, rank: int, block: int) -> LowRankCurvature:
    """The curvature of ``log_joint`` at u (d,) from about ``rank`` Hessian-vector
    products in blocks of ``block``, without a d x d matrix.

    Gaussian probes start a block Krylov space of the negative Hessian P (fully
    re-orthogonalized); its Ritz pairs (theta, v) give the directions whose widths
    ``theta^(-1/2)`` are exact first, the narrowest ones. The other directions get one
    width ``c^(-1/2)``, c the mean Rayleigh quotient of P over one more block of Gaussian
    probes projected off the Krylov space (P's mean curvature there). Directions of zero
    or negative curvature get the width ``c^(-1/2)`` too (1 where c <= 0).

    Returns:
        A ``LowRankCurvature`` with m <= rank Ritz directions (fewer where the Krylov
        space closes early).
    """
    d = u.shape[0]
    size = min(rank, d)
    block = max(1, min(block, size))
    probes = torch.randn(block, d, dtype=u.dtype, device=u.device)
    basis, image = _orthonormal(probes, negative_hessian_products(log_joint, u, probes))
    bases, products = [basis], [image]
    count = basis.shape[0]
    while count < size:
        basis = _orthonormal_against(products[-1], bases)[: size - count]
        if not basis.shape[0]:
            break
        bases.append(basis)
        products.append(negative_hessian_products(log_joint, u, basis))
        count += basis.shape[0]
    q, pq = torch.cat(bases), torch.cat(products)  # (m, d) orthonormal rows, and P q
    projected = q @ pq.T
    theta, y = torch.linalg.eigh(0.5 * (projected + projected.T))
    vectors = (y.T @ q).T  # (d, m)
    rest = theta.new_ones(())
    if q.shape[0] < d:
        others = _project_off(torch.randn(block, d, dtype=u.dtype, device=u.device), q)
        quotient = (others * negative_hessian_products(log_joint, u, others)).sum(-1)
        rest = (quotient / others.square().sum(-1)).mean()
    positive_definite = bool((theta > 0).all()) and bool(rest > 0)
    if not rest > 0:
        rest = theta.new_ones(())
    tiny = torch.finfo(u.dtype).tiny
    scale = rest.rsqrt().expand(d).clone()
    widths = torch.where(theta > 0, (rest / theta.clamp(min=tiny)).sqrt(), torch.ones_like(theta))
    return LowRankCurvature(scale, vectors, widths, positive_definite)


def _orthonormal(rows: Tensor, images: Tensor) -> tuple[Tensor, Tensor]:
    """Orthonormal rows q spanning ``rows`` (b, d, independent), and the operator's images
    of q from its images of ``rows``: ``rows = R^T q`` gives ``images(q) = R^-T images``."""
    q, r = torch.linalg.qr(rows.T)
    return q.T, torch.linalg.solve_triangular(r.T, images, upper=False)


def _orthonormal_against(rows: Tensor, bases: list) -> Tensor:
    """The rows orthogonalized (twice) against every row of ``bases``, then orthonormal;
    directions that vanish are dropped."""
    norm = rows.norm(dim=-1, keepdim=True)
    q, r = torch.linalg.qr(_project_off(rows, torch.cat(bases)).T)
    keep = r.diagonal().abs() > 1e-8 * norm.max()
    return q[:, keep].T


def _project_off(rows: Tensor, basis: Tensor) -> Tensor:
    """``rows`` (b, d) with their components along the orthonormal rows of ``basis``
    removed, twice (one pass leaves rounding errors along the basis)."""
    for _ in range(2):
        rows = rows - (rows @ basis.T) @ basis
    return rows


def lbfgs_mode(
    log_joint: LogJoint,
    u: Tensor,
    max_iter: int = 500,
    tol: float = 1e-3,
    every: int = 10,
    coarse: tuple[LogJoint, torch.dtype] | None = None,
) -> tuple[Tensor, Tensor]:
    """Climb ``log_joint`` from u (d,) by L-BFGS (20 pairs of history, O(d) memory) with
    a strong Wolfe line search, until ``every`` iterations gain less than ``tol`` nats
    together or after ``max_iter`` iterations. Where it ends lower than u or not finite: u.

    ``coarse``: a cheaper log joint and the dtype of its points (the model's float32
    beside a float64 ``log_joint``), climbed first until it stops gaining; the same
    L-BFGS, its history kept, then finishes on ``log_joint``.

    Returns:
        ``(u, log_p)``: the point (d,) and its log density (a scalar tensor).
    """
    start = u.detach().clone()
    with torch.no_grad():
        start_value = log_joint(start[None])[0]
    point = start.clone().requires_grad_(True)
    current, dtype = (log_joint, start.dtype) if coarse is None else coarse
    # torch's own tolerances would stop it where a step's largest coordinate is below
    # tolerance_change: far too early along narrow directions (widths of 1e-2).
    optimizer = torch.optim.LBFGS(
        [point],
        lr=1,
        max_iter=every,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        # torch's default of 100 pairs makes the two-loop recursion (hundreds of small
        # ops) cost more than a cheap model's evaluation; 20 needs as many evaluations.
        history_size=20,
    )

    memo: dict[str, Tensor] = {}

    def closure() -> Tensor:
        # Each step begins where the last one's line search mostly ended, on its last
        # evaluation: that evaluation is reused, not repeated.
        optimizer.zero_grad()
        here = point.detach()
        if memo and torch.equal(memo["point"], here):
            point.grad = memo["grad"].clone()
            return memo["loss"]
        with torch.enable_grad():
            loss = -current(point.to(dtype)[None])[0].to(point.dtype)
            if not torch.isfinite(loss):
                # Out of the support: a high value that the line search backs away from.
                return loss.detach().nan_to_num(1e300, 1e300, 1e300)
            loss.backward()
        memo.update(point=here.clone(), grad=point.grad.clone(), loss=loss.detach())
        return loss

    def value_here() -> Tensor:
        return -closure().detach()

    with warnings.catch_warnings(), pyro.validation_enabled(False):
        warnings.simplefilter("ignore")
        best = start_value if coarse is None else value_here()
        for _ in range(max(1, max_iter // every)):
            optimizer.step(closure)
            value = value_here()
            if not (torch.isfinite(value) and value - best >= tol):
                if current is log_joint:
                    break
                current, dtype = log_joint, start.dtype
                memo.clear()
                value = value_here()
            best = value
        if current is not log_joint:  # max_iter reached in the coarse phase
            with torch.no_grad():
                value = log_joint(point.detach()[None])[0]
    if not (torch.isfinite(value) and value >= start_value):
        return start, start_value
    return point.detach(), value
