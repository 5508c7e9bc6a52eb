"""Expectation-maximization for Gaussian mixtures, and EM pretraining of a CWM.

The loop (initialize, E-step, M-step, convergence) is written once; the E-step returns
the per-point joint log-probabilities and the M-step works from the responsibility
sufficient statistics (N_k, sum_n r_nk x_n, sum_n r_nk x_n^2), the sums a data-parallel
version would all-reduce across devices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from inference.kmeans import kmeans
from inference.validation import as_data_tensor
from pyro_cwm.nn.checks import check_positive_int


@dataclass
class DiagonalGaussianMixtureFit:
    """Result of :func:`fit_diagonal_gmm`.

    Attributes:
        weights: mixture weights (K,).
        means: component means (K, d).
        variances: per-dimension component variances (K, d).
        log_likelihood: mean log-likelihood per point before each M-step and, last, at the
            returned parameters.
        converged: whether the change fell below ``tol`` within ``max_iter`` steps.
        n_iter: number of EM steps done.
    """

    weights: Tensor
    means: Tensor
    variances: Tensor
    log_likelihood: list[float] = field(default_factory=list)
    converged: bool = False
    n_iter: int = 0


def diagonal_joint_log_probs(
    data: Tensor, weights: Tensor, means: Tensor, variances: Tensor
) -> Tensor:
    """``log pi_k + log N(x_n; mu_k, diag var_k)`` for every point and component: (N, K)."""
    precision = variances.reciprocal()
    # Expanded square: (N, K) from matrix products, never an (N, K, d) tensor.
    mahalanobis = (
        (data**2) @ precision.T - 2 * data @ (means * precision).T + (means**2 * precision).sum(-1)
    ).clamp_min(0)
    log_det = variances.log().sum(-1)
    d = data.shape[-1]
    return weights.log() - 0.5 * (d * math.log(2 * math.pi) + log_det + mahalanobis)


def _diagonal_m_step(data: Tensor, resp: Tensor, reg_covar: float) -> tuple[Tensor, Tensor, Tensor]:
    eps = 10 * torch.finfo(data.dtype).eps
    counts = resp.sum(0) + eps  # N_k; eps keeps an empty component finite
    sum_x = resp.T @ data
    sum_x2 = resp.T @ data**2
    means = sum_x / counts[:, None]
    variances = (sum_x2 / counts[:, None] - means**2).clamp_min(0) + reg_covar
    return counts / counts.sum(), means, variances


def fit_diagonal_gmm(
    data,
    num_components: int,
    *,
    max_iter: int = 100,
    tol: float = 1e-5,
    reg_covar: float = 1e-6,
    seed: int | None = None,
) -> DiagonalGaussianMixtureFit:
    """Fit a diagonal Gaussian mixture by EM from a k-means start.

    Args:
        data: points, shape (N, d), numpy or torch; runs on the tensor's device.
        num_components: K, at most the number of distinct points.
        max_iter: maximum number of EM steps.
        tol: stop when the mean log-likelihood changes by less than this.
        reg_covar: added to every variance (keeps collapsed components finite); with 0 the
            log-likelihood never decreases.
        seed: seed of the k-means++ initialization.

    Raises:
        ValueError: for bad data, K < 1, K larger than the number of distinct points, or a
            negative ``reg_covar`` or ``tol``.
    """
    data = as_data_tensor(data)
    check_positive_int("num_components", num_components)
    check_positive_int("max_iter", max_iter, allow_zero=True)
    if reg_covar < 0:
        raise ValueError(f"reg_covar must be >= 0, got {reg_covar}")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    distinct = torch.unique(data, dim=0).shape[0]
    if num_components > distinct:
        raise ValueError(
            f"num_components ({num_components}) is larger than the number of distinct "
            f"data points ({distinct})"
        )
    generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
    # Work on centered data: the expanded squares in the E-step lose less precision.
    center = data.mean(0)
    data = data - center
    _, labels = kmeans(data, num_components, generator)
    resp = torch.nn.functional.one_hot(labels, num_components).to(data.dtype)
    params = _diagonal_m_step(data, resp, reg_covar)

    history: list[float] = []
    converged = False
    n_iter = 0
    for step in range(1, max_iter + 1):
        n_iter = step
        log_joint = diagonal_joint_log_probs(data, *params)
        log_norm = torch.logsumexp(log_joint, -1, keepdim=True)
        history.append(log_norm.mean().item())
        params = _diagonal_m_step(data, (log_joint - log_norm).exp(), reg_covar)
        if len(history) > 1 and abs(history[-1] - history[-2]) < tol:
            converged = True
            break
    history.append(torch.logsumexp(diagonal_joint_log_probs(data, *params), -1).mean().item())
    weights, means, variances = params
    return DiagonalGaussianMixtureFit(
        weights, means + center, variances, history, converged, n_iter
    )


def em_pretrain(cwm, data, **options) -> DiagonalGaussianMixtureFit:
    """Fit a diagonal GMM to ``data`` by EM and copy it into ``cwm``.

    Afterwards the CWM's density equals the fitted mixture's (constant classifier with
    bias log weights, location-scale maps at the means and standard deviations). The
    options are those of :func:`fit_diagonal_gmm`; K is ``cwm.num_components``.
    """
    data = as_data_tensor(data, dim=cwm.dim)
    fit = fit_diagonal_gmm(data, cwm.num_components, **options)
    cwm.set_gaussian_mixture(fit.weights, fit.means, fit.variances.sqrt())
    return fit
