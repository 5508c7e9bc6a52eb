r"""What differs between the covariance families of a Gaussian mixture under EM.

The EM loop (``inference.em.loop``) is written once; this module holds, per family, the
three things it needs: the E-step log-densities of a chunk of points, the sufficient
statistics of a chunk given its responsibilities, and the M-step from summed statistics.

Two schemes compute the first two. The feature scheme (float64 default) writes both as
matrix products with the features ``[x, q(x), 1]`` of ``second_order_features``:
fast, with moments about the origin of the (centered) data. The centered scheme (float32
default) whitens ``x_n - mu_k`` per component and takes moments about the E-step's means:
twice the flops, but accurate in single precision however far apart the clusters are.

The statistics are sums over points (``N_k = sum_n r_nk``, ``S1_k = sum_n r_nk x_n`` and a
family-specific second moment), so chunks, data streams and devices combine by adding
them. The parameters follow scikit-learn's conventions: ``covariances`` of shape
(K, d, d) full, (d, d) tied, (K, d) diag, (K,) spherical, () constant, and
``precisions_cholesky`` the upper-triangular P with ``P P^T = Sigma^{-1}`` (for the
diagonal families ``1/sqrt(covariance)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from pyro_cwm.distributions.gaussian_mixture import log_det_precision_factor

ILL_DEFINED = (
    "Fitting the mixture model failed because some components have ill-defined empirical "
    "covariance (for instance caused by singleton or collapsed samples). Try to decrease "
    "the number of components, increase reg_covar, or scale the input data."
)


@dataclass
class GaussianMixtureParameters:
    """Weights (K,), means (K, d), covariances and precision factors of one family."""

    weights: Tensor
    means: Tensor
    covariances: Tensor
    precisions_cholesky: Tensor

    def to(self, **kwargs) -> GaussianMixtureParameters:
        values = (getattr(self, f.name).to(**kwargs) for f in fields(self))
        return GaussianMixtureParameters(*values)

    def shifted(self, shift: Tensor) -> GaussianMixtureParameters:
        """The same mixture for data translated by ``-shift`` (means minus ``shift``)."""
        return GaussianMixtureParameters(
            self.weights, self.means - shift, self.covariances, self.precisions_cholesky
        )


@dataclass
class SufficientStatistics:
    """Additive EM statistics of a set of points (sums, so they combine across chunks).

    The moments are taken about ``center``: the origin (None) in the feature scheme, the
    E-step's component means (K, d) in the centered scheme.

    Attributes:
        count: number of points.
        log_likelihood: sum of the points' log-likelihoods under the E-step parameters.
        resp: ``N_k`` (K,).
        first: ``sum_n r_nk (x_n - c_k)`` (K, d).
        second: about the origin, the upper triangles of ``sum_n r_nk x_n x_n^T`` (K, P)
            for full, of ``sum_n x_n x_n^T`` (P,) for tied (P = d(d+1)/2); about the
            means, ``sum_n r_nk (x_n - c_k)(x_n - c_k)^T`` (K, d, d) for full and tied.
            For diag ``sum_n r_nk (x_n - c_k)^2`` (K, d); for spherical and constant
            ``sum_n r_nk |x_n - c_k|^2`` (K, 1).
        center: None, or the component centers c (K, d) shared by every added term.
    """

    count: Tensor
    log_likelihood: Tensor
    resp: Tensor
    first: Tensor
    second: Tensor
    center: Tensor | None = None

    _SUMS = ("count", "log_likelihood", "resp", "first", "second")

    def __add__(self, other: SufficientStatistics) -> SufficientStatistics:
        sums = (getattr(self, name) + getattr(other, name) for name in self._SUMS)
        return SufficientStatistics(*sums, center=self.center)

    def scaled(self, factor: float) -> SufficientStatistics:
        sums = (getattr(self, name) * factor for name in self._SUMS)
        return SufficientStatistics(*sums, center=self.center)


def feature_width(dim: int, kind: str) -> int:
    """Number of columns of ``second_order_features`` for d = ``dim``."""
    quad = {"full": dim * (dim + 1) // 2, "tied": dim * (dim + 1) // 2, "diag": dim}
    return dim + quad.get(kind, 1) + 1


def second_order_features(x: Tensor, kind: str, out: Tensor | None = None) -> Tensor:
    """``[x, q(x), 1]`` for a chunk (n, d): the features that both EM steps are linear in.

    ``q(x)`` is ``x_i x_j`` for i <= j (full, tied), ``x^2`` (diag) or ``|x|^2``
    (spherical, constant). The E-step's joint log-densities are one matrix product of the
    features with per-component weights (the constant column carries the normalizers),
    and the statistics are ``resp @ features``: two large GEMMs per chunk instead of K
    small ones, and half the flops of whitening every point for every component.
    ``out``: an (n, m) tensor to write them into (a buffer reused across chunks).
    """
    d = x.shape[-1]
    if out is None:
        out = x.new_empty(x.shape[0], feature_width(d, kind))
    out[:, :d] = x
    if kind in ("full", "tied"):
        # Blocks x_i * x_{i..d-1}, in triu_indices order, written in place (a gather or a
        # concatenation would cost a pass more).
        start = d
        for i in range(d):
            torch.mul(x[:, i : i + 1], x[:, i:], out=out[:, start : start + d - i])
            start += d - i
    elif kind == "diag":
        torch.square(x, out=out[:, d:-1])
    else:
        torch.square(x, out=out[:, :d])  # |x|^2 from the squares, then x over them
        torch.sum(out[:, :d], -1, keepdim=True, out=out[:, d:-1])
        out[:, :d] = x
    out[:, -1] = 1.0
    return out


def _pack_upper(matrices: Tensor) -> Tensor:
    d = matrices.shape[-1]
    i, j = torch.triu_indices(d, d, device=matrices.device)
    return matrices[..., i, j]


def unpack_symmetric(packed: Tensor, dim: int) -> Tensor:
    """The symmetric (..., d, d) matrices whose upper triangles are ``packed`` (..., P)."""
    i, j = torch.triu_indices(dim, dim, device=packed.device)
    out = packed.new_zeros(*packed.shape[:-1], dim, dim)
    out[..., i, j] = packed
    out[..., j, i] = packed
    return out


def joint_log_probs(
    features: Tensor, params: GaussianMixtureParameters, kind: str
) -> Tensor:
    """``log pi_k + log N(x_n; mu_k, Sigma_k)`` of a chunk from its features: (K, n).

    ``(x - mu)^T L (x - mu) = q(x) . w(L) - 2 x^T L mu + mu^T L mu`` with L the precision,
    so the whole joint log-density is one matrix product. The expanded square is
    accurate on data centered near the means (the EM loop centers the data), as in
    scikit-learn's diagonal families. The component-major (K, n) layout keeps the
    reductions over k and the statistics' product contiguous.
    """
    return feature_weights(params, kind) @ features.T


def feature_weights(params: GaussianMixtureParameters, kind: str) -> Tensor:
    """The weights (K, m) with ``joint_log_probs = weights @ features^T``."""
    means, factor = params.means, params.precisions_cholesky
    d = means.shape[-1]
    if kind in ("full", "tied"):
        prec = factor @ factor.mT
        off = 2.0 - torch.eye(d, dtype=prec.dtype, device=prec.device)  # x_i x_j twice
        quad = _pack_upper(prec * off)
        if kind == "tied":
            lin = means @ prec  # (K, d)
            quad = quad.expand(means.shape[0], -1)
        else:
            lin = (prec @ means.unsqueeze(-1)).squeeze(-1)
    elif kind == "diag":
        quad = factor.square()
        lin = means * quad
    else:  # spherical (K,), constant ()
        prec = factor.square().expand(means.shape[0])
        quad, lin = prec.unsqueeze(-1), means * prec.unsqueeze(-1)
    log_det = log_det_precision_factor(factor, kind, d).expand(means.shape[0])
    const = (
        params.weights.log() + log_det
        - 0.5 * (d * math.log(2 * math.pi) + (lin * means).sum(-1))
    )
    return torch.cat([lin, -0.5 * quad, const.unsqueeze(-1)], -1)  # (K, m)


def chunk_statistics(
    features: Tensor, resp: Tensor, log_norm: Tensor, kind: str, dim: int
) -> SufficientStatistics:
    """Statistics of a chunk from its features (n, m) and responsibilities (K, n)."""
    moments = resp @ features  # (K, m): every moment in one product
    second = features[:, dim:-1].sum(0) if kind == "tied" else moments[:, dim:-1]
    return SufficientStatistics(
        features.new_tensor(float(features.shape[0])),
        log_norm.sum(),
        moments[:, -1],
        moments[:, :dim],
        second,
    )


def centered_joint_log_probs(
    x: Tensor, params: GaussianMixtureParameters, kind: str
) -> tuple[Tensor, Tensor]:
    """``log pi_k + log N(x_n; mu_k, Sigma_k)`` (K, n) by whitening every difference.

    The accurate scheme (scikit-learn's for the full family): no expanded square, so no
    cancellation when the clusters are far apart relative to their widths, at twice the
    flops of the feature scheme. Returns the differences ``x_n - mu_k`` (K, n, d) too,
    for ``centered_statistics``.
    """
    means, factor = params.means, params.precisions_cholesky
    d = means.shape[-1]
    diff = x.unsqueeze(0) - means.unsqueeze(1)  # (K, n, d)
    if kind in ("full", "tied"):
        maha = (diff @ factor).square().sum(-1)
    elif kind == "diag":
        maha = (diff * factor.unsqueeze(1)).square().sum(-1)
    else:  # spherical (K,), constant ()
        maha = diff.square().sum(-1) * factor.square().expand(means.shape[0]).unsqueeze(-1)
    log_det = log_det_precision_factor(factor, kind, d).expand(means.shape[0])
    const = params.weights.log() + log_det - 0.5 * d * math.log(2 * math.pi)
    return const.unsqueeze(-1) - 0.5 * maha, diff


def centered_statistics(
    diff: Tensor, resp: Tensor, log_norm: Tensor, kind: str, center: Tensor
) -> SufficientStatistics:
    """Statistics about ``center`` (K, d) from differences (K, n, d) and resp (K, n)."""
    weighted = resp.unsqueeze(-1) * diff
    if kind in ("full", "tied"):
        second = weighted.mT @ diff
    elif kind == "diag":
        second = (weighted * diff).sum(1)
    else:
        second = (weighted * diff).sum((1, 2)).unsqueeze(-1)
    return SufficientStatistics(
        diff.new_tensor(float(diff.shape[1])),
        log_norm.sum(),
        resp.sum(1),
        weighted.sum(1),
        second,
        center,
    )


def m_step(
    stats: SufficientStatistics, kind: str, reg_covar: float, constant_variance: float
) -> GaussianMixtureParameters:
    """Maximum-likelihood parameters from summed statistics (scikit-learn's M-step).

    Raises:
        ValueError: if a covariance is not positive definite (a collapsed component with
            too small a ``reg_covar``).
    """
    nk = stats.resp + 10 * torch.finfo(stats.resp.dtype).eps  # an empty component stays finite
    weights = nk / nk.sum()
    offset = stats.first / nk.unsqueeze(-1)  # the means, relative to the center
    means = offset if stats.center is None else stats.center + offset
    d = means.shape[-1]
    eye = torch.eye(d, dtype=means.dtype, device=means.device)
    second = stats.second
    if kind in ("full", "tied") and stats.center is None:
        second = unpack_symmetric(second, d)
    if kind == "full":
        cov = second / nk[:, None, None] - offset.unsqueeze(-1) * offset.unsqueeze(-2)
        cov = 0.5 * (cov + cov.mT) + reg_covar * eye
    elif kind == "tied":
        if stats.center is not None:
            second = second.sum(0)
        cov = (second - (nk.unsqueeze(-1) * offset).T @ offset) / nk.sum()
        cov = 0.5 * (cov + cov.T) + reg_covar * eye
    elif kind == "diag":
        cov = (second / nk.unsqueeze(-1) - offset.square()).clamp_min(0) + reg_covar
    elif kind == "spherical":
        cov = second.squeeze(-1) / nk - offset.square().sum(-1)
        cov = (cov / d).clamp_min(0) + reg_covar
    else:
        cov = means.new_tensor(constant_variance)
    return GaussianMixtureParameters(weights, means, cov, precision_cholesky(cov, kind))


def precision_cholesky(covariances: Tensor, kind: str) -> Tensor:
    """The upper factor P with ``P P^T = Sigma^{-1}`` (``1/sqrt`` for diagonal families).

    Raises:
        ValueError: if a covariance is not positive definite.
    """
    if kind in ("full", "tied"):
        chol, info = torch.linalg.cholesky_ex(covariances)
        if (info != 0).any():
            raise ValueError(_ill_defined(covariances))
        eye = torch.eye(covariances.shape[-1], dtype=chol.dtype, device=chol.device)
        return torch.linalg.solve_triangular(chol, eye, upper=False).mT
    if not (covariances > 0).all():
        raise ValueError(_ill_defined(covariances))
    return covariances.rsqrt()


def precision_cholesky_from_precisions(precisions: Tensor, kind: str) -> Tensor:
    """P from precision matrices (full, tied) or precisions (diagonal families).

    Uses the Cholesky factor of the reversed matrix, so that P is upper triangular as in
    scikit-learn. Raises ValueError if a precision is not positive definite.
    """
    if kind in ("full", "tied"):
        flipped, info = torch.linalg.cholesky_ex(precisions.flip(-2, -1))
        if (info != 0).any():
            raise ValueError("precisions_init must be symmetric positive definite")
        return flipped.flip(-2, -1)
    if not (precisions > 0).all():
        raise ValueError("precisions_init must be positive")
    return precisions.sqrt()


def precisions_from_cholesky(factor: Tensor, kind: str) -> Tensor:
    """``P P^T`` (full, tied) or ``P^2`` (diagonal families)."""
    return factor @ factor.mT if kind in ("full", "tied") else factor.square()


def covariances_from_cholesky(factor: Tensor, kind: str) -> Tensor:
    """The covariances whose precision factor is ``factor``."""
    if kind in ("full", "tied"):
        eye = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device)
        inverse = torch.linalg.solve_triangular(factor, eye, upper=True)
        return inverse.mT @ inverse
    return factor.square().reciprocal()


def scale_from_covariances(covariances: Tensor, kind: str) -> Tensor:
    """The ``scale`` argument of the Gaussian mixture for these covariances.

    See [`GaussianMixture`][pyro_cwm.distributions.GaussianMixture].
    """
    if kind in ("full", "tied"):
        return torch.linalg.cholesky(covariances)
    return covariances.sqrt()


def num_parameters(kind: str, num_components: int, dim: int) -> int:
    """Free parameters of a K-component mixture in d dimensions (for BIC and AIC)."""
    cov = {
        "full": num_components * dim * (dim + 1) // 2,
        "tied": dim * (dim + 1) // 2,
        "diag": num_components * dim,
        "spherical": num_components,
        "constant": 0,  # the variance is fixed, not estimated
    }[kind]
    return cov + num_components * dim + num_components - 1


def _ill_defined(covariances: Tensor) -> str:
    if covariances.dtype == torch.float32:
        return ILL_DEFINED + (
            " The numerical accuracy can also be improved by passing float64 data instead "
            "of float32."
        )
    return ILL_DEFINED
