"""Built-in Bayesian models with their data (no downloads)."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

#: Rubin's eight schools: estimated effects and their standard errors.
EIGHT_SCHOOLS_Y = torch.tensor([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0])
EIGHT_SCHOOLS_SIGMA = torch.tensor([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0])


def eight_schools(y: Tensor, sigma: Tensor) -> None:
    """Eight schools, centered parameterization (a funnel in (log tau, theta)).

    mu ~ N(0, 5), tau ~ HalfCauchy(5), theta_j ~ N(mu, tau), y_j ~ N(theta_j, sigma_j).
    """
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", y.shape[0]):
        theta = pyro.sample("theta", dist.Normal(mu, tau))
        pyro.sample("obs", dist.Normal(theta, sigma), obs=y)


def tight_regression(
    dtype: torch.dtype = torch.float64, num: int = 10_000, seed: int = 0
) -> tuple:
    """A tightly identified Bayesian linear regression and its exact posterior.

    y = 1 + x @ (1, -2, 0.5) + N(0, 0.1^2) on ``num`` points with uncentered covariates
    (x ~ N((2, -1, 0.5), I)); priors intercept ~ N(0, 1), beta ~ N(0, I). The posterior
    sds are about 1e-3 of the prior's (issue 12's fourth case), and the posterior is
    Gaussian, known in closed form (computed in float64).

    Returns:
        ``(model, args, mean, sd)``: the Pyro model (sites ``intercept`` and ``beta``, in
        ``dtype``), its arguments ``(x, y)``, and the exact posterior mean and sds (4,) of
        (intercept, beta) in float64.
    """
    generator = torch.Generator().manual_seed(seed)
    sigma = 0.1
    x = torch.randn(num, 3, generator=generator, dtype=torch.float64)
    x = x + torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64) + 1.0
    y = y + sigma * torch.randn(num, generator=generator, dtype=torch.float64)
    design = torch.cat([torch.ones(num, 1, dtype=torch.float64), x], 1)
    covariance = torch.linalg.inv(
        torch.eye(4, dtype=torch.float64) + design.T @ design / sigma**2
    )
    mean = covariance @ design.T @ y / sigma**2

    def model(x: Tensor, y: Tensor) -> None:
        intercept = pyro.sample("intercept", dist.Normal(torch.tensor(0.0, dtype=dtype), 1.0))
        beta = pyro.sample("beta", dist.Normal(torch.zeros(3, dtype=dtype), 1.0).to_event(1))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(intercept + (x * beta).sum(-1), sigma), obs=y)

    return model, (x.to(dtype), y.to(dtype)), mean, covariance.diagonal().sqrt()
