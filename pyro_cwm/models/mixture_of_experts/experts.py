"""The experts of a mixture of experts: K local regression models ``p(y | x, expert k)``.

Every expert family is one module holding all K experts, batched over a leading expert
dimension, and answers the questions a variational EM loop asks of it (see
[`Experts`][pyro_cwm.models.Experts]): the expected log-likelihood of every point under
every expert, the update of the experts' parameters from responsibility-weighted data (the
"E-step" of the parameters), the update of their hyperparameters (the M-step), and their
term of the lower bound. The gate that weights them is in ``mixture_of_experts.gates``, the
model that combines both in ``mixture_of_experts.mixture``. Two families:

- [`BayesianLinearExperts`][pyro_cwm.models.BayesianLinearExperts]: ``y = x^T w_k + eps``,
  ``eps ~ N(0, 1/beta_k)``, prior ``w_k ~ N(w0_k, A_k)``. With responsibilities ``r_nk`` the
  posterior is Gaussian in closed form:

    ```text
    B_k^{-1} = A_k^{-1} + beta_k sum_n r_nk x_n x_n^T
    m_k      = B_k (A_k^{-1} w0_k + beta_k sum_n r_nk y_n x_n)
    ```

    and ``w0_k``, ``A_k``, ``beta_k`` are updated by type-II maximum likelihood when asked.

- [`ModuleExperts`][pyro_cwm.models.ModuleExperts]: any K torch regression modules
  ``f_k(x)`` with Gaussian noise, point-estimated by a weighted maximum-likelihood M-step
  (gradient steps).

Regularizers couple the prior means ``w0_1..w0_K`` of linear experts in their M-step:
[`PullPriorMeans`][pyro_cwm.models.PullPriorMeans] (a quadratic pull of the prior means
towards each other) and [`PriorMeanLink`][pyro_cwm.models.PriorMeanLink] (a user-given
differentiable log-link ``R(w0)`` maximized).
"""

from __future__ import annotations

import abc
import copy
import math
from collections.abc import Callable, Iterable, Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

from pyro_cwm.models.point_sums import point_sums
from pyro_cwm.nn.checks import check_positive_int

__all__ = [
    "Experts",
    "BayesianLinearExperts",
    "ModuleExperts",
    "PriorMeanRegularizer",
    "PullPriorMeans",
    "PriorMeanLink",
]

LOG_2PI = math.log(2.0 * math.pi)
HYPERPARAMETERS = ("prior_mean", "prior_cov", "noise")


class Experts(nn.Module, abc.ABC):
    """Base class of K local models fitted by a (variational) EM loop.

    Shapes: ``X`` (N, d), ``Y`` (N,), responsibilities or hard assignments ``weights``
    (N, K) with rows on the simplex. A subclass implements every method below; the
    ``pyro_*`` methods write the same experts as part of a Pyro model.
    """

    num_experts: int
    input_dim: int

    @abc.abstractmethod
    def initialize(self, X: Tensor, Y: Tensor) -> None:
        """Reset to a random start (uses torch's global RNG) before an EM run."""

    @abc.abstractmethod
    def expected_log_likelihood(self, X: Tensor, Y: Tensor) -> Tensor:
        """``E_q[log p(y_n | x_n, expert k)]``: shape (N, K)."""

    @abc.abstractmethod
    def update_posterior(self, X: Tensor, Y: Tensor, weights: Tensor) -> None:
        """Update the experts' parameters (or their posterior) from weighted data."""

    @abc.abstractmethod
    def update_hyperparameters(self, X: Tensor, Y: Tensor, weights: Tensor) -> None:
        """M-step of the hyperparameters (noise level, priors) from weighted data."""

    @abc.abstractmethod
    def bound(self) -> Tensor:
        """The experts' own term of the lower bound (``-sum_k KL(q(w_k) || p(w_k))``)."""

    @abc.abstractmethod
    def predictive(self, X: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and standard deviation of each expert's predictive: (N, K) each."""

    def forward(self, X: Tensor) -> Tensor:
        """Each expert's prediction ``E[y | x, k]``: shape (N, K)."""
        return self.predictive(X)[0]

    @abc.abstractmethod
    def pyro_means(self, X: Tensor) -> Tensor:
        """Inside a Pyro model: sample or register the parameters, return means (N, K)."""

    @abc.abstractmethod
    def pyro_scales(self) -> Tensor:
        """Inside a Pyro model: the noise standard deviations (K,)."""


def _as_matrix_batch(value, K: int, d: int, name: str, dtype) -> Tensor:
    """A prior covariance given as a float, (d,), (d, d) or (K, d, d) -> (K, d, d)."""
    value = torch.as_tensor(value, dtype=dtype)
    if value.dim() == 0:
        value = value * torch.eye(d, dtype=dtype)
    elif value.dim() == 1 and value.shape[0] == d:
        value = torch.diag(value)
    if value.shape not in ((d, d), (K, d, d)):
        raise ValueError(
            f"{name} must be a float or have shape ({d},), ({d}, {d}) or ({K}, {d}, {d}), "
            f"got {tuple(value.shape)}"
        )
    value = value.expand(K, d, d).clone()
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} must be finite")
    if not torch.allclose(value, value.mT):
        raise ValueError(f"{name} must be symmetric")
    if torch.linalg.eigvalsh(value.double()).min() <= 0:
        raise ValueError(f"{name} must be positive definite")
    return value


def _inverse_and_logdet(matrix: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse and log-determinant of symmetric positive definite matrices (..., d, d)."""
    chol = torch.linalg.cholesky(matrix)
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    inverse = torch.cholesky_solve(eye.expand_as(matrix), chol)
    logdet = 2.0 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return inverse, logdet


class BayesianLinearExperts(Experts):
    """K Bayesian linear regression experts ``y = x^T w_k + N(0, 1/beta_k)``.

    Prior ``w_k ~ N(w0_k, A_k)``; the variational posterior ``q(w_k) = N(m_k, B_k)`` is the
    closed-form Gaussian posterior from the responsibility-weighted data (see
    [the module documentation][pyro_cwm.models.mixture_of_experts.experts]).
    No intercept is added: append a column of ones to ``X`` for one.

    Args:
        num_experts: K >= 1.
        input_dim: d >= 1, the number of features.
        prior_mean: ``w0``: a float, shape (d,) or (K, d).
        prior_cov: ``A``: a float (times the identity), a diagonal (d,), a matrix (d, d) or
            one per expert (K, d, d); symmetric positive definite.
        noise_precision: ``beta`` > 0: a float or one per expert (K,). When ``"noise"`` is
            optimized it is initialized from the data instead.
        optimize: which hyperparameters the M-step updates, a subset of ``("prior_mean",
            "prior_cov", "noise")`` (the seed's ``OptimizedHyper``). Optimizing both prior
            mean and covariance of one expert from its own posterior shrinks the prior onto
            it, which freezes the experts; the default updates the noise only.

    Buffers (state): ``prior_mean`` (K, d), ``prior_cov`` (K, d, d), ``noise_precision``
    (K,), ``post_mean`` (K, d), ``post_cov`` (K, d, d).

    Raises:
        TypeError, ValueError: for an argument of the wrong type, shape or range.
    """

    def __init__(
        self,
        num_experts: int,
        input_dim: int,
        *,
        prior_mean: float | Tensor = 0.0,
        prior_cov: float | Tensor = 100.0,
        noise_precision: float | Tensor = 1.0,
        optimize: Iterable[str] = ("noise",),
    ) -> None:
        super().__init__()
        K = self.num_experts = check_positive_int("num_experts", num_experts)
        d = self.input_dim = check_positive_int("input_dim", input_dim)
        # Floating tensors keep their precision (the widest given); numbers take the default.
        dtype = torch.get_default_dtype()
        for value in (prior_mean, prior_cov, noise_precision):
            if isinstance(value, Tensor) and value.is_floating_point():
                dtype = torch.promote_types(dtype, value.dtype)
        if isinstance(optimize, str):
            optimize = (optimize,)
        self.optimize = frozenset(optimize)
        unknown = self.optimize - set(HYPERPARAMETERS)
        if unknown:
            raise ValueError(
                f"optimize must be a subset of {HYPERPARAMETERS}, got {sorted(unknown)}"
            )
        w0 = torch.as_tensor(prior_mean, dtype=dtype)
        if (
            w0.dim() > 2
            or (w0.dim() >= 1 and w0.shape[-1] != d)
            or (w0.dim() == 2 and w0.shape[0] != K)
        ):
            raise ValueError(
                f"prior_mean must be a float or have shape ({d},) or ({K}, {d}), "
                f"got {tuple(w0.shape)}"
            )
        if not torch.isfinite(w0).all():
            raise ValueError("prior_mean must be finite")
        beta = torch.as_tensor(noise_precision, dtype=dtype)
        if beta.dim() > 1 or (beta.dim() == 1 and beta.shape[0] != K):
            raise ValueError(
                f"noise_precision must be a float or have shape ({K},), got {tuple(beta.shape)}"
            )
        if not (torch.isfinite(beta).all() and (beta > 0).all()):
            raise ValueError(f"noise_precision must be finite and > 0, got {noise_precision}")
        A = _as_matrix_batch(prior_cov, K, d, "prior_cov", dtype)
        # The constructor's values, restored by initialize() at every restart.
        self.register_buffer("initial_prior_mean", w0.expand(K, d).clone(), persistent=False)
        self.register_buffer("initial_prior_cov", A, persistent=False)
        self.register_buffer("initial_noise_precision", beta.expand(K).clone(), persistent=False)
        self.register_buffer("prior_mean", self.initial_prior_mean.clone())
        self.register_buffer("prior_cov", A.clone())
        self.register_buffer("noise_precision", self.initial_noise_precision.clone())
        self.register_buffer("post_mean", self.initial_prior_mean.clone())
        self.register_buffer("post_cov", A.clone())

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, input_dim={self.input_dim}, "
            f"optimize={sorted(self.optimize)}"
        )

    # ------------------------------------------------------------------ EM pieces

    def initialize(self, X: Tensor, Y: Tensor) -> None:
        """Restore the constructor's priors; start each expert from least squares on a
        random subset of max(2d, d + 2) points (distinct starting planes), with a zero
        posterior covariance; ``beta`` from the residuals of a global least-squares fit
        when the noise is optimized."""
        K, d = self.num_experts, self.input_dim
        self.prior_mean.copy_(self.initial_prior_mean)
        self.prior_cov.copy_(self.initial_prior_cov)
        self.noise_precision.copy_(self.initial_noise_precision)
        sums = point_sums()
        N = sums.count(X.shape[0])
        size = min(N, max(2 * d, d + 2))
        ridge = 1e-6 * torch.eye(d, dtype=X.dtype, device=X.device)
        for k in range(K):
            idx = torch.randperm(N, device=X.device)[:size]
            Xs, Ys = sums.rows(X, idx), sums.rows(Y, idx)
            gram = Xs.T @ Xs + ridge * (1.0 + Xs.square().sum())
            self.post_mean[k] = torch.linalg.solve(gram, Xs.T @ Ys)
        self.post_cov.zero_()
        if "noise" in self.optimize:
            xx, xy, x2 = sums.total([X.T @ X, X.T @ Y, X.square().sum()])
            w = torch.linalg.solve(xx + ridge * (1.0 + x2), xy)
            r2, y2 = sums.total([(Y - X @ w).square().sum(), Y.square().sum()])
            variance = (r2 / N).clamp_min(1e-12 * (1.0 + y2 / N))
            self.noise_precision.fill_(float(1.0 / variance))

    def _quadratic(self, X: Tensor) -> Tensor:
        """``x_n^T B_k x_n``: (N, K)."""
        return torch.einsum("ni,kij,nj->nk", X, self.post_cov, X)

    def expected_log_likelihood(self, X: Tensor, Y: Tensor) -> Tensor:
        """``0.5 log(beta_k / 2 pi) - beta_k/2 [(y_n - x_n^T m_k)^2 + x_n^T B_k x_n]``: (N, K)."""
        beta = self.noise_precision
        residual = Y.unsqueeze(-1) - X @ self.post_mean.T
        return 0.5 * (beta.log() - LOG_2PI) - 0.5 * beta * (residual.square() + self._quadratic(X))

    def update_posterior(self, X: Tensor, Y: Tensor, weights: Tensor) -> None:
        """Closed-form Gaussian posterior of every expert from the weighted data."""
        beta = self.noise_precision
        prior_precision, _ = _inverse_and_logdet(self.prior_cov)
        sxx, sxy = point_sums().total(
            [
                torch.einsum("nk,ni,nj->kij", weights, X, X),
                torch.einsum("nk,ni,n->ki", weights, X, Y),
            ]
        )
        precision = prior_precision + beta[:, None, None] * sxx
        precision = 0.5 * (precision + precision.mT)
        rhs = (prior_precision @ self.prior_mean.unsqueeze(-1)).squeeze(-1) + beta[:, None] * sxy
        chol = torch.linalg.cholesky(precision)
        eye = torch.eye(self.input_dim, dtype=X.dtype, device=X.device).expand_as(precision)
        self.post_cov.copy_(torch.cholesky_solve(eye, chol))
        self.post_mean.copy_(torch.cholesky_solve(rhs.unsqueeze(-1), chol).squeeze(-1))

    def update_hyperparameters(
        self,
        X: Tensor,
        Y: Tensor,
        weights: Tensor,
        regularizer: PriorMeanRegularizer | None = None,
    ) -> None:
        """Type-II maximum likelihood of ``beta_k``, ``w0_k`` and ``A_k`` (those optimized).

        ``1/beta_k = sum_n r_nk E[(y_n - x_n^T w_k)^2] / sum_n r_nk``; ``w0_k = m_k`` (or
        the regularizer's maximizer, which is then always applied); ``A_k = B_k + (m_k -
        w0_k)(m_k - w0_k)^T``. Each is the exact maximizer of the lower bound given the
        others, so soft EM never decreases the bound.
        """
        if "noise" in self.optimize:
            sums = point_sums()
            residual = Y.unsqueeze(-1) - X @ self.post_mean.T
            mass, sq, y2 = sums.total(
                [
                    weights.sum(0),
                    (weights * (residual.square() + self._quadratic(X))).sum(0),
                    Y.square().sum(),
                ]
            )
            floor = 1e-10 * (1.0 + y2 / sums.count(X.shape[0]))
            variance = (sq / mass.clamp_min(1e-30)).clamp_min(floor)
            # An expert without data keeps its noise level.
            beta = torch.where(mass > 1e-8, 1.0 / variance, self.noise_precision)
            self.noise_precision.copy_(beta)
        if regularizer is not None:
            regularizer.update_prior_means(self)
        elif "prior_mean" in self.optimize:
            self.prior_mean.copy_(self.post_mean)
        if "prior_cov" in self.optimize:
            diff = self.post_mean - self.prior_mean
            cov = self.post_cov + diff.unsqueeze(-1) * diff.unsqueeze(-2)
            jitter = 1e-8 * cov.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-30)
            eye = torch.eye(self.input_dim, dtype=cov.dtype, device=cov.device)
            self.prior_cov.copy_(0.5 * (cov + cov.mT) + jitter[:, None, None] * eye)

    def kl_divergence(self) -> Tensor:
        """``KL(N(m_k, B_k) || N(w0_k, A_k))`` per expert: (K,)."""
        prior_precision, prior_logdet = _inverse_and_logdet(self.prior_cov)
        _, post_logdet = _inverse_and_logdet(self.post_cov)
        diff = self.post_mean - self.prior_mean
        trace = (prior_precision * self.post_cov).sum((-2, -1))
        mahalanobis = torch.einsum("ki,kij,kj->k", diff, prior_precision, diff)
        return 0.5 * (trace + mahalanobis - self.input_dim + prior_logdet - post_logdet)

    def bound(self) -> Tensor:
        """``-sum_k KL(q(w_k) || p(w_k))``: a scalar."""
        return -self.kl_divergence().sum()

    def predictive(self, X: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior predictive of each expert: mean ``x^T m_k`` and standard deviation
        ``sqrt(1/beta_k + x^T B_k x)``, (N, K) each."""
        mean = X @ self.post_mean.T
        var = 1.0 / self.noise_precision + self._quadratic(X).clamp_min(0.0)
        return mean, var.sqrt()

    # ------------------------------------------------------------------ Pyro model

    def pyro_means(self, X: Tensor) -> Tensor:
        """Sample site ``"weights"`` ``w_k ~ N(w0_k, A_k)`` (K, d) in plate ``"experts"``;
        return ``X w_k``: (N, K). ``w0``, ``A`` and ``beta`` are fixed hyperparameters."""
        with pyro.plate("experts", self.num_experts, dim=-1):
            prior = dist.MultivariateNormal(
                self.prior_mean.to(X), covariance_matrix=self.prior_cov.to(X)
            )
            w = pyro.sample("weights", prior)
        return X @ w.mT

    def pyro_scales(self) -> Tensor:
        """Noise standard deviations ``1/sqrt(beta_k)``: (K,)."""
        return self.noise_precision.rsqrt()


class ModuleExperts(Experts):
    """K arbitrary torch regression modules ``f_k: (N, d) -> (N,)`` or (N, 1), with Gaussian
    noise ``N(0, sigma_k^2)``, point-estimated.

    The weighted M-step maximizes ``sum_n r_nk log N(y_n | f_k(x_n), sigma_k^2)``: ``steps``
    Adam steps on the modules' parameters (kept only if the objective improved, so soft EM
    still never decreases its bound) and then ``sigma_k`` in closed form. There is no
    posterior over the parameters, so the bound term is zero. In the Pyro model the modules
    are registered with ``pyro.module`` (fitted by SVI, fixed under MCMC).

    Args:
        modules: the K regression modules.
        input_dim: d, the number of features.
        steps: Adam steps per M-step.
        lr: Adam learning rate.

    Raises:
        TypeError: if an entry of ``modules`` is not a ``torch.nn.Module``.
        ValueError: if ``modules`` is empty or an argument is out of range.
    """

    def __init__(
        self, modules: Sequence[nn.Module], input_dim: int, *, steps: int = 50, lr: float = 1e-2
    ) -> None:
        super().__init__()
        modules = list(modules)
        if not modules:
            raise ValueError("modules must hold at least one module")
        for m in modules:
            if not isinstance(m, nn.Module):
                raise TypeError(f"modules must be torch.nn.Modules, got {type(m).__name__}")
        self.num_experts = len(modules)
        self.input_dim = check_positive_int("input_dim", input_dim)
        self.steps = check_positive_int("steps", steps, allow_zero=True)
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {lr}")
        self.lr = float(lr)
        self.nets = nn.ModuleList(modules)
        self.register_buffer("noise_scale", torch.ones(self.num_experts))

    def initialize(self, X: Tensor, Y: Tensor) -> None:
        """Reset every module that has ``reset_parameters`` (recursively), and the noise to
        the standard deviation of ``Y``."""
        for net in self.nets:
            for module in net.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        sums = point_sums()
        N = sums.count(Y.shape[0])
        if N > 1:
            y1, y2 = sums.total([Y.sum(), Y.square().sum()])
            std = ((y2 - y1 * y1 / N) / (N - 1)).clamp_min(0).sqrt()
            self.noise_scale.fill_(float(std.clamp_min(1e-6)))
        else:
            self.noise_scale.fill_(1.0)

    def _means(self, X: Tensor) -> Tensor:
        return torch.stack([net(X).reshape(X.shape[0]) for net in self.nets], dim=-1)

    def _objective(self, X: Tensor, Y: Tensor, weights: Tensor) -> Tensor:
        residual = Y.unsqueeze(-1) - self._means(X)
        return -(weights * residual.square() / (2 * self.noise_scale.square())).sum()

    def expected_log_likelihood(self, X: Tensor, Y: Tensor) -> Tensor:
        """``log N(y_n | f_k(x_n), sigma_k^2)``: (N, K)."""
        with torch.no_grad():
            return dist.Normal(self._means(X), self.noise_scale).log_prob(Y.unsqueeze(-1))

    def update_posterior(self, X: Tensor, Y: Tensor, weights: Tensor) -> None:
        """Weighted maximum likelihood of the modules' parameters by Adam."""
        if self.steps == 0 or not any(p.requires_grad for p in self.nets.parameters()):
            return
        sums = point_sums()
        N = sums.count(X.shape[0])
        with torch.no_grad():
            start = sums.total(self._objective(X, Y, weights))
        saved = copy.deepcopy(self.nets.state_dict())
        optimizer = torch.optim.Adam(self.nets.parameters(), lr=self.lr)
        with torch.enable_grad():
            for _ in range(self.steps):
                optimizer.zero_grad()
                (-self._objective(X, Y, weights) / N).backward()
                sums.total_gradients(self.nets.parameters())
                optimizer.step()
        with torch.no_grad():
            end = sums.total(self._objective(X, Y, weights))
        if not (end >= start):
            self.nets.load_state_dict(saved)

    def update_hyperparameters(self, X: Tensor, Y: Tensor, weights: Tensor) -> None:
        """``sigma_k^2 = sum_n r_nk (y_n - f_k(x_n))^2 / sum_n r_nk``."""
        with torch.no_grad():
            sums = point_sums()
            mass, sq, y2 = sums.total(
                [
                    weights.sum(0),
                    (weights * (Y.unsqueeze(-1) - self._means(X)).square()).sum(0),
                    Y.square().sum(),
                ]
            )
            floor = 1e-10 * (1.0 + y2 / sums.count(X.shape[0]))
            scale = (sq / mass.clamp_min(1e-30)).clamp_min(floor).sqrt()
            self.noise_scale.copy_(torch.where(mass > 1e-8, scale, self.noise_scale))

    def bound(self) -> Tensor:
        return self.noise_scale.new_zeros(())

    def predictive(self, X: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            mean = self._means(X)
        return mean, self.noise_scale.expand_as(mean)

    def pyro_means(self, X: Tensor) -> Tensor:
        for k, net in enumerate(self.nets):
            pyro.module(f"expert_{k}", net)
        return self._means(X)

    def pyro_scales(self) -> Tensor:
        return self.noise_scale


# ---------------------------------------------------------------------- regularizers


class PriorMeanRegularizer(abc.ABC):
    """Couples the prior means ``w0`` (K, d) of Bayesian linear experts in the M-step.

    The M-step of [`BayesianLinearExperts`][pyro_cwm.models.BayesianLinearExperts] maximizes
    ``sum_k E_q[log N(w_k | w0_k, A_k)] + penalty(w0)`` over ``w0``; ``penalty`` is added to
    the EM lower bound.
    """

    @abc.abstractmethod
    def update_prior_means(self, experts: BayesianLinearExperts) -> None:
        """Set ``experts.prior_mean`` to the maximizer of the objective above."""

    @abc.abstractmethod
    def penalty(self, prior_mean: Tensor) -> Tensor:
        """The coupling term of the bound for prior means (K, d): a scalar."""


def _check_linear(experts) -> BayesianLinearExperts:
    if not isinstance(experts, BayesianLinearExperts):
        raise TypeError(
            f"prior-mean regularizers need BayesianLinearExperts, got {type(experts).__name__}"
        )
    return experts


def _prior_mean_objective(experts: BayesianLinearExperts, w0: Tensor, precision: Tensor) -> Tensor:
    """``-1/2 sum_k (m_k - w0_k)^T A_k^{-1} (m_k - w0_k)``: the part of the bound in ``w0``."""
    diff = experts.post_mean - w0
    return -0.5 * torch.einsum("ki,kij,kj->", diff, precision, diff)


class PullPriorMeans(PriorMeanRegularizer):
    """Pull the experts' prior means together (the seed's ``RegularizeModel``).

    Penalty ``-(alpha / 2) sum_{k < k'} |w0_k - w0_k'|^2``. The M-step solves the linear
    system of the stationarity conditions

        (A_k^{-1} + alpha (K - 1)) w0_k - alpha sum_{k' != k} w0_k' = A_k^{-1} m_k

    jointly for all k (exact, so the lower bound still never decreases). ``alpha -> 0``
    gives ``w0_k = m_k``; ``alpha -> inf`` one common prior mean.

    Args:
        strength: alpha >= 0.

    Raises:
        ValueError: if ``strength`` is negative or not finite.
    """

    def __init__(self, strength: float = 1.0) -> None:
        if not (isinstance(strength, (int, float)) and math.isfinite(strength) and strength >= 0):
            raise ValueError(f"strength must be a finite number >= 0, got {strength}")
        self.strength = float(strength)

    def penalty(self, prior_mean: Tensor) -> Tensor:
        K = prior_mean.shape[0]
        total = prior_mean.sum(0)
        spread = K * prior_mean.square().sum() - total.square().sum()
        return -0.5 * self.strength * spread

    def update_prior_means(self, experts: BayesianLinearExperts) -> None:
        experts = _check_linear(experts)
        K, d = experts.num_experts, experts.input_dim
        precision, _ = _inverse_and_logdet(experts.prior_cov)
        eye_k = torch.eye(K, dtype=precision.dtype, device=precision.device)
        eye_d = torch.eye(d, dtype=precision.dtype, device=precision.device)
        laplacian = K * eye_k - torch.ones_like(eye_k)
        system = torch.block_diag(*precision) + self.strength * torch.kron(laplacian, eye_d)
        rhs = (precision @ experts.post_mean.unsqueeze(-1)).reshape(K * d)
        experts.prior_mean.copy_(torch.linalg.solve(system, rhs).reshape(K, d))

    def __repr__(self) -> str:
        return f"PullPriorMeans(strength={self.strength})"


class PriorMeanLink(PriorMeanRegularizer):
    """A user-given differentiable link ``R(w0)`` between the prior means, maximized in the
    M-step (the seed's ``RegularizeFunc``): ``R`` is a log-density-like scalar function of
    the (K, d) prior means. The M-step takes ``steps`` Adam steps on
    ``-1/2 sum_k (m_k - w0_k)^T A_k^{-1} (m_k - w0_k) + R(w0)`` from the current ``w0`` and
    keeps the result only if that objective improved.

    Args:
        link: ``R``, a function of a (K, d) tensor returning a scalar tensor.
        steps: Adam steps per M-step.
        lr: Adam learning rate.

    Raises:
        TypeError: if ``link`` is not callable.
        ValueError: if ``steps`` or ``lr`` is out of range, or ``R`` is not a finite scalar.
    """

    def __init__(
        self, link: Callable[[Tensor], Tensor], *, steps: int = 100, lr: float = 0.05
    ) -> None:
        if not callable(link):
            raise TypeError(f"link must be callable, got {type(link).__name__}")
        self.link = link
        self.steps = check_positive_int("steps", steps)
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {lr}")
        self.lr = float(lr)

    def penalty(self, prior_mean: Tensor) -> Tensor:
        value = self.link(prior_mean)
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise ValueError("link must return a scalar tensor")
        return value.reshape(())

    def update_prior_means(self, experts: BayesianLinearExperts) -> None:
        experts = _check_linear(experts)
        precision, _ = _inverse_and_logdet(experts.prior_cov)

        def objective(w0: Tensor) -> Tensor:
            return _prior_mean_objective(experts, w0, precision) + self.penalty(w0)

        start = experts.prior_mean.clone()
        with torch.no_grad():
            before = objective(start)
        w0 = start.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([w0], lr=self.lr)
        with torch.enable_grad():
            for _ in range(self.steps):
                optimizer.zero_grad()
                (-objective(w0)).backward()
                optimizer.step()
        with torch.no_grad():
            after = objective(w0)
        if torch.isfinite(after) and after >= before:
            experts.prior_mean.copy_(w0.detach())

    def __repr__(self) -> str:
        return f"PriorMeanLink(link={self.link!r}, steps={self.steps}, lr={self.lr})"
