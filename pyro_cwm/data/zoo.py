"""A model zoo written as users write Pyro models, each with an exact or near-exact posterior.

- ``mixture_enum``: a 1-D mixture of two unit-variance clusters at -2 and +2 (100 points,
  equal weights fixed), the two means latent with prior N(0, 5^2), the assignments
  enumerated (``config_enumerate``). Reference: 2-D quadrature of the posterior of the
  means (draws from the grid, log Z); the posterior is bimodal by label switching.
- ``hierarchical``: 200 groups of 5 observations, theta_g ~ N(mu, 1), y ~ N(theta_g, 2^2),
  mu ~ N(0, 10^2); SVI subsamples 50 groups per step, so theta is a local latent in a
  subsampled plate (fit by an ``AutoGuideList``). Reference: the conjugate posterior of
  the global mean mu (exact) and the exact log evidence.
- ``logistic``: logistic regression on 20,000 points (intercept and 3 correlated
  covariates, prior N(0, 1)), SVI subsamples 1,000 points per step. Reference: the
  Laplace approximation corrected by importance resampling (4,000 of 8,000 draws from
  a widened Laplace proposal).
- ``linreg100``: Bayesian linear regression with 100 coefficients (correlated design,
  known noise): a 100-D Gaussian posterior known in closed form, with its log evidence.

Each builder returns a [`ZooPosterior`][pyro_cwm.data.zoo.ZooPosterior]: the model and
its arguments for SVI, the arguments for the same model on full data (NUTS, PSIS), the
reference draws of the compared sites and what is known exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import config_enumerate
from pyro.ops.indexing import Vindex
from torch import Tensor

from pyro_cwm.data.posteriordb import ReferencePosterior


@dataclass
class ZooPosterior(ReferencePosterior):
    """A zoo model with reference draws and what a benchmark needs to judge a fit: a
    [`ReferencePosterior`][pyro_cwm.data.posteriordb.ReferencePosterior] with more fields.

    Attributes:
        full_args: the model's arguments without subsampling (for NUTS and PSIS); the
            ``args`` tuple itself where the model does not subsample.
        log_z: the exact log evidence log p(data), or None where it is not known.
        global_sites: for a model with local latents in a subsampled plate, the global
            sites (the compared ones); a guide then is an ``AutoGuideList`` of a guide on
            these and an ``AutoNormal`` on the rest. None otherwise.
        notes: free-text remarks about the reference.
    """

    full_args: tuple = ()
    log_z: float | None = None
    global_sites: list[str] | None = None
    notes: list[str] = field(default_factory=list)


# --- the enumerated mixture ---------------------------------------------------------------

MIXTURE_PRIOR_SCALE = 5.0


@config_enumerate
def mixture_enum(y: Tensor) -> None:
    """Two unit-variance clusters with equal fixed weights; the means ``loc`` (2,) are
    latent with prior N(0, 5^2) and each point's assignment ``z`` is enumerated."""
    loc = pyro.sample("loc", dist.Normal(0.0, MIXTURE_PRIOR_SCALE).expand([2]).to_event(1))
    with pyro.plate("data", y.shape[0]):
        z = pyro.sample("z", dist.Categorical(torch.full((2,), 0.5)))
        pyro.sample("y", dist.Normal(Vindex(loc)[..., z], 1.0), obs=y)


def mixture_log_joint(loc: Tensor, y: Tensor) -> Tensor:
    """log p(loc, y) of [`mixture_enum`][pyro_cwm.data.zoo.mixture_enum] with the
    assignments summed out: ``loc`` (..., 2) -> (...)."""
    prior = dist.Normal(0.0, MIXTURE_PRIOR_SCALE).log_prob(loc).sum(-1)
    per_point = dist.Normal(loc[..., None, :], 1.0).log_prob(y[:, None]).logsumexp(-1)
    return prior + per_point.sum(-1) - y.shape[0] * math.log(2.0)


def mixture_quadrature(
    y: Tensor, half_width: float = 5.0, num: int = 501
) -> tuple[Tensor, Tensor, float]:
    """The posterior of [`mixture_enum`][pyro_cwm.data.zoo.mixture_enum] on a square grid.

    Returns ``(grid, log_mass, log_z)``: the grid (num,), the normalized log mass of each
    cell (num, num) (midpoint rule) and log p(y). Computed in float64, row by row.
    """
    y = y.double()
    grid = torch.linspace(-half_width, half_width, num, dtype=torch.float64)
    step = (grid[1] - grid[0]).item()
    # log N(y_n | g_i) - log 2 once; each grid row then sums logaddexp over the points.
    per_loc = dist.Normal(grid, 1.0).log_prob(y[:, None]) - math.log(2.0)  # (N, num)
    prior = dist.Normal(0.0, MIXTURE_PRIOR_SCALE).log_prob(grid)
    log_lik = torch.stack(
        [torch.logaddexp(per_loc[:, i, None], per_loc).sum(0) for i in range(num)]
    )
    log_joint = log_lik + prior[:, None] + prior[None, :]
    log_z = (log_joint.logsumexp((0, 1)) + 2 * math.log(step)).item()
    return grid, log_joint - log_joint.logsumexp((0, 1)), log_z


def make_mixture_enum(num_draws: int = 10_000, seed: int = 0) -> ZooPosterior:
    """The enumerated mixture with 100 points (50 from N(-2, 1), 50 from N(2, 1)) and
    ``num_draws`` reference draws from the quadrature grid (uniform within a cell)."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(100, generator=generator)
    y = torch.cat((noise[:50] - 2.0, noise[50:] + 2.0))
    grid, log_mass, log_z = mixture_quadrature(y)
    step = (grid[1] - grid[0]).item()
    cells = torch.multinomial(log_mass.exp().reshape(-1), num_draws, True, generator=generator)
    jitter = (torch.rand(num_draws, 2, generator=generator, dtype=torch.float64) - 0.5) * step
    draws = torch.stack((grid[cells // grid.shape[0]], grid[cells % grid.shape[0]]), -1)
    args = (y,)
    return ZooPosterior(
        "mixture_enum",
        mixture_enum,
        args,
        ["loc[1]", "loc[2]"],
        (draws + jitter).float(),
        full_args=args,
        log_z=log_z,
        notes=["reference: 2-D quadrature (501^2 grid on [-5, 5]^2)"],
    )


# --- the hierarchical model with a subsampled plate ---------------------------------------

HIER_TAU, HIER_SIGMA, HIER_PRIOR_SCALE = 1.0, 2.0, 10.0


def hierarchical(y: Tensor, subsample_size: int | None = None) -> None:
    """Normal hierarchy over groups: mu ~ N(0, 10^2), theta_g ~ N(mu, 1) and the rows of
    ``y`` (G, n) ~ N(theta_g, 2^2); the group plate subsamples ``subsample_size`` groups
    (all when None)."""
    mu = pyro.sample("mu", dist.Normal(0.0, HIER_PRIOR_SCALE))
    with pyro.plate("groups", y.shape[0], subsample_size=subsample_size) as index:
        theta = pyro.sample("theta", dist.Normal(mu, HIER_TAU))
        pyro.sample("y", dist.Normal(theta[..., None], HIER_SIGMA).to_event(1), obs=y[index])


def hierarchical_posterior(y: Tensor) -> tuple[float, float, float]:
    """Conjugate results for [`hierarchical`][pyro_cwm.data.zoo.hierarchical] on ``y``
    (G, n): ``(mean, sd, log_z)`` of the posterior of mu and the log evidence.

    With theta integrated out, the group means ybar_g ~ N(mu, tau^2 + sigma^2 / n) are
    independent given mu; the evidence is that of the whole y as one Gaussian vector,
    cov = blockdiag(sigma^2 I + tau^2 11^T) + s0^2 11^T.
    """
    y = y.double()
    groups, n = y.shape
    v = HIER_TAU**2 + HIER_SIGMA**2 / n
    precision = 1 / HIER_PRIOR_SCALE**2 + groups / v
    mean = (y.mean(1).sum() / v / precision).item()
    block = HIER_SIGMA**2 * torch.eye(n, dtype=torch.float64) + HIER_TAU**2
    cov = torch.block_diag(*[block] * groups) + HIER_PRIOR_SCALE**2
    log_z = dist.MultivariateNormal(torch.zeros(groups * n, dtype=torch.float64), cov).log_prob(
        y.reshape(-1)
    )
    return mean, precision**-0.5, log_z.item()


def make_hierarchical(
    num_groups: int = 200, subsample_size: int = 50, num_draws: int = 10_000, seed: int = 0
) -> ZooPosterior:
    """The hierarchical model on simulated data (mu = 1.5) with exact reference draws of mu."""
    generator = torch.Generator().manual_seed(seed)
    theta = 1.5 + HIER_TAU * torch.randn(num_groups, 1, generator=generator)
    y = theta + HIER_SIGMA * torch.randn(num_groups, 5, generator=generator)
    mean, sd, log_z = hierarchical_posterior(y)
    draws = mean + sd * torch.randn(num_draws, 1, generator=generator, dtype=torch.float64)
    return ZooPosterior(
        "hierarchical",
        hierarchical,
        (y, subsample_size),
        ["mu"],
        draws.float(),
        full_args=(y, None),
        log_z=log_z,
        global_sites=["mu"],
        notes=[f"SVI subsamples {subsample_size} of {num_groups} groups; exact conjugate mu"],
    )


# --- logistic regression with data subsampling --------------------------------------------


def logistic(x: Tensor, y: Tensor, subsample_size: int | None = None) -> None:
    """Logistic regression: b ~ N(0, 1), w ~ N(0, 1)^d, y ~ Bernoulli(sigmoid(b + x w))
    with ``x`` (N, d), ``y`` (N,); the data plate subsamples ``subsample_size`` points."""
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    with pyro.plate("data", x.shape[0], subsample_size=subsample_size) as index:
        logits = b + (x[index] * w).sum(-1)
        pyro.sample("y", dist.Bernoulli(logits=logits), obs=y[index])


def _logistic_log_joint(beta: Tensor, design: Tensor, y: Tensor) -> Tensor:
    """log p(beta, y) with beta = (b, w) (..., d + 1) and design = [1, x] (N, d + 1)."""
    logits = beta @ design.T
    return dist.Normal(0.0, 1.0).log_prob(beta).sum(-1) + (
        y * logits - torch.nn.functional.softplus(logits)
    ).sum(-1)


def logistic_reference(
    x: Tensor, y: Tensor, num_draws: int, generator: torch.Generator, proposals: int = 2
) -> tuple[Tensor, float]:
    """Draws of (b, w) from the posterior of [`logistic`][pyro_cwm.data.zoo.logistic]:
    Newton's method to the mode, then sampling-importance-resampling from the Laplace
    Gaussian with its covariance widened by 1.2^2 (``proposals * num_draws`` proposals).

    Returns the draws (num_draws, d + 1) in float64 and the importance effective sample
    size relative to the number of proposals (near 1: the Laplace Gaussian is nearly exact).
    """
    design = torch.cat((torch.ones(x.shape[0], 1), x), -1).double()
    y = y.double()
    beta = torch.zeros(design.shape[1], dtype=torch.float64)
    for _ in range(50):
        p = torch.sigmoid(design @ beta)
        grad = design.T @ (y - p) - beta
        hess = (design.T * (p * (1 - p))) @ design + torch.eye(design.shape[1])
        delta = torch.linalg.solve(hess, grad)
        beta = beta + delta
        if delta.abs().max() < 1e-12:
            break
    proposal = dist.MultivariateNormal(beta, covariance_matrix=1.44 * torch.linalg.inv(hess))
    num = proposals * num_draws
    eps = torch.randn(num, design.shape[1], generator=generator, dtype=torch.float64)
    candidates = beta + eps @ torch.linalg.cholesky(proposal.covariance_matrix).T
    log_w = torch.cat(
        [_logistic_log_joint(c, design, y) - proposal.log_prob(c) for c in candidates.split(1000)]
    )
    weights = (log_w - log_w.max()).exp()
    ess = (weights.sum() ** 2 / (weights**2).sum() / num).item()
    pick = torch.multinomial(weights, num_draws, True, generator=generator)
    return candidates[pick], ess


def make_logistic(
    num_points: int = 20_000, subsample_size: int = 1000, num_draws: int = 4000, seed: int = 0
) -> ZooPosterior:
    """Logistic regression on simulated data: 3 covariates with correlation 0.8, true
    intercept -0.5 and weights (1, -1, 0.5)."""
    generator = torch.Generator().manual_seed(seed)
    mix = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.8, 0.0, 0.6]])
    x = torch.randn(num_points, 3, generator=generator) @ mix.T
    logits = -0.5 + x @ torch.tensor([1.0, -1.0, 0.5])
    y = torch.bernoulli(torch.sigmoid(logits), generator=generator)
    draws, ess = logistic_reference(x, y, num_draws, generator)
    return ZooPosterior(
        "logistic",
        logistic,
        (x, y, subsample_size),
        ["b", "w[1]", "w[2]", "w[3]"],
        draws.float(),
        full_args=(x, y, None),
        notes=[
            f"SVI subsamples {subsample_size} of {num_points} points; reference: Laplace "
            f"+ importance resampling (relative ESS {ess:.2f})"
        ],
    )


# --- a 100-dimensional conjugate linear regression ----------------------------------------

LINREG_SIGMA = 1.0


def linreg(x: Tensor, y: Tensor) -> None:
    """Bayesian linear regression with known noise: w ~ N(0, 1)^d, y ~ N(x w, 1) with
    ``x`` (N, d) and ``y`` (N,) one event (so ``w`` needs no slot for a data plate)."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    pyro.sample("y", dist.Normal(w @ x.T, LINREG_SIGMA).to_event(1), obs=y)


def linreg_posterior(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, float]:
    """Exact posterior of [`linreg`][pyro_cwm.data.zoo.linreg]: ``(mean (d,), cov (d, d),
    log_z)``, with log_z = log N(y | 0, x x^T + sigma^2 I)."""
    x, y = x.double(), y.double()
    precision = torch.eye(x.shape[1], dtype=torch.float64) + x.T @ x / LINREG_SIGMA**2
    cov = torch.linalg.inv(precision)
    mean = cov @ x.T @ y / LINREG_SIGMA**2
    marginal = x @ x.T + LINREG_SIGMA**2 * torch.eye(x.shape[0], dtype=torch.float64)
    log_z = dist.MultivariateNormal(torch.zeros_like(y), marginal).log_prob(y).item()
    return mean, 0.5 * (cov + cov.T), log_z


def ar1_covariates(
    num_points: int, dim: int, generator: torch.Generator, rho: float = 0.9
) -> Tensor:
    """Covariates (num_points, dim), standard normal each, with AR(1) correlation ``rho``
    across columns (a strongly correlated regression posterior)."""
    noise = torch.randn(num_points, dim, generator=generator)
    x = torch.empty_like(noise)
    x[:, 0] = noise[:, 0]
    for j in range(1, dim):
        x[:, j] = rho * x[:, j - 1] + math.sqrt(1 - rho**2) * noise[:, j]
    return x


def make_linreg100(
    dim: int = 100, num_points: int = 200, num_draws: int = 10_000, seed: int = 0
) -> ZooPosterior:
    """The 100-D regression on simulated data: covariates with AR(1) correlation 0.9
    across columns, so the posterior is strongly correlated; exact reference draws."""
    generator = torch.Generator().manual_seed(seed)
    x = ar1_covariates(num_points, dim, generator)
    w = torch.randn(dim, generator=generator)
    y = x @ w + LINREG_SIGMA * torch.randn(num_points, generator=generator)
    mean, cov, log_z = linreg_posterior(x, y)
    eps = torch.randn(num_draws, dim, generator=generator, dtype=torch.float64)
    draws = mean + eps @ torch.linalg.cholesky(cov).T
    args = (x, y)
    return ZooPosterior(
        "linreg100",
        linreg,
        args,
        [f"w[{i + 1}]" for i in range(dim)],
        draws.float(),
        full_args=args,
        log_z=log_z,
        notes=["exact Gaussian posterior"],
    )


#: The zoo: target name -> builder (keyword ``seed``).
ZOO: dict[str, Callable[..., ZooPosterior]] = {
    "mixture_enum": make_mixture_enum,
    "hierarchical": make_hierarchical,
    "logistic": make_logistic,
    "linreg100": make_linreg100,
}
