"""Reference posteriors from posteriordb as Pyro models with their ground-truth draws.

The data and the draws live outside the package (the project's ``shared/refpost``
folder: ``data.json``, ``draws.json`` with 10 chains of 1,000 Stan NUTS draws each). Each
model is written from the posterior's definition; flat improper priors are written as a
proper base whose density a ``pyro.factor`` cancels, so that initializers can draw.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor

from pyro_cwm.data.posteriors import eight_schools


@dataclass
class ReferencePosterior:
    """A posterior with reference draws.

    Attributes:
        name: posteriordb name.
        model: the Pyro model; call it as ``model(*args)``.
        args: the model's arguments (tensors).
        columns: parameter names of the reference draws, e.g. ``"theta[3]"``.
        draws: reference draws, shape (num_draws, len(columns)).
    """

    name: str
    model: Callable
    args: tuple
    columns: list[str]
    draws: Tensor

    def flatten(self, samples: dict[str, Tensor]) -> Tensor:
        """Site samples {name: (N, *shape)} as a (N, len(columns)) matrix in column order."""
        out = []
        for column in self.columns:
            match = re.fullmatch(r"(\w+)\[(\d+)\]", column)
            if match:
                site, index = match.group(1), int(match.group(2)) - 1
                value = samples[site]
                out.append(value.reshape(value.shape[0], -1)[:, index])
            else:
                out.append(samples[column].reshape(samples[column].shape[0]))
        return torch.stack(out, -1)


def _flat_positive(name: str, one: Tensor) -> Tensor:
    """A positive site with a flat (improper) prior: proper LogNormal base, cancelled.

    ``one`` is a scalar 1 of the model's dtype."""
    base = dist.LogNormal(0.0 * one, 10.0 * one)
    value = pyro.sample(name, base)
    pyro.factor(f"{name}_flat_prior", -base.log_prob(value))
    return value


def low_dim_gauss_mix(y: Tensor) -> None:
    """Two-component 1-D Gaussian mixture without the ordering of the means: the
    posterior is exactly bimodal by label switching."""
    mu = pyro.sample("mu", dist.Normal(0.0, 2.0).expand([2]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(2.0).expand([2]).to_event(1))
    theta = pyro.sample("theta", dist.Beta(5.0, 5.0))
    # Under outer plates every site keeps a size-1 slot for the data plate (dim -1), so
    # the component axis is simply the last one.
    mix = torch.stack((theta, 1 - theta), -1).log()
    with pyro.plate("data", y.shape[0]):
        log_lik = torch.logsumexp(mix + dist.Normal(mu, sigma).log_prob(y[:, None]), -1)
        pyro.factor("y", log_lik)


def kilpisjarvi(x: Tensor, y: Tensor, prior: tuple[float, float, float, float]) -> None:
    """Linear regression on uncentered years; alpha and beta correlate at -0.99999."""
    one = torch.ones((), dtype=x.dtype)
    mu_alpha, sd_alpha, mu_beta, sd_beta = prior
    alpha = pyro.sample("alpha", dist.Normal(mu_alpha * one, sd_alpha * one))
    beta = pyro.sample("beta", dist.Normal(mu_beta * one, sd_beta * one))
    sigma = _flat_positive("sigma", one)
    with pyro.plate("data", y.shape[0]):
        pyro.sample("y", dist.Normal(alpha + beta * x, sigma), obs=y)


def ar_k(y: Tensor, order: int) -> None:
    """AR(K): y_t ~ N(alpha + sum_k beta_k y_{t-k}, sigma) for t > K."""
    alpha = pyro.sample("alpha", dist.Normal(0.0, 10.0))
    beta = pyro.sample("beta", dist.Normal(0.0, 10.0).expand([order]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfCauchy(2.5))
    lags = torch.stack([y[order - k - 1 : y.shape[0] - k - 1] for k in range(order)], -1)
    mean = alpha + (lags * beta).sum(-1)
    with pyro.plate("data", y.shape[0] - order):
        pyro.sample("y", dist.Normal(mean, sigma), obs=y[order:])


def gp_pois_regr(x: Tensor, k: Tensor) -> None:
    """Latent GP Poisson regression (centered): f ~ MVN(0, K(rho, alpha)), k ~ Poisson(e^f).

    K has a 1e-10 jitter as in posteriordb, which needs double precision: pass ``x`` and
    ``k`` as float64 and every site is float64.
    """
    one = torch.ones((), dtype=x.dtype)
    rho = pyro.sample("rho", dist.Gamma(25.0 * one, 4.0 * one))
    alpha = pyro.sample("alpha", dist.HalfNormal(2.0 * one))
    sq = (x[:, None] - x[None, :]) ** 2
    cov = alpha[..., None, None] ** 2 * torch.exp(-sq / (2 * rho[..., None, None] ** 2))
    cov = cov + 1e-10 * torch.eye(x.shape[0], dtype=x.dtype)
    f = pyro.sample("f", dist.MultivariateNormal(torch.zeros_like(x), covariance_matrix=cov))
    # One event of N counts: f's event axis is the data axis, so no plate is needed.
    pyro.sample("k", dist.Poisson(f.exp()).to_event(1), obs=k)


def _read(root: Path, folder: str) -> tuple[dict, list[str], Tensor]:
    data = json.loads((root / folder / "data.json").read_text())
    chains = json.loads((root / folder / "draws.json").read_text())
    columns = list(chains[0])
    draws = torch.tensor([[v for column in columns for v in [chain[column]]] for chain in chains])
    # (chains, columns, draws) -> (chains * draws, columns)
    draws = draws.permute(0, 2, 1).reshape(-1, len(columns))
    return data, columns, draws


POSTERIORS = ["eight_schools", "low_dim_gauss_mix", "kilpisjarvi", "arK", "gp_pois_regr"]


def load_reference_posterior(name: str, root: str | Path) -> ReferencePosterior:
    """Load posterior ``name`` (one of ``POSTERIORS``) from the refpost folder ``root``.

    ``eight_schools`` is written centered (a funnel); its reference draws come from the
    non-centered run of the same posterior. ``low_dim_gauss_mix`` is written without the
    ordering of the means, so its reference draws are symmetrized by adding the
    label-swapped copy.

    Raises:
        ValueError: for an unknown name. FileNotFoundError: if the folder is missing.
    """
    root = Path(root)
    tensor = torch.tensor
    if name == "eight_schools":
        data, columns, draws = _read(root, "eight_schools-eight_schools_noncentered")
        args = (tensor(data["y"], dtype=torch.float), tensor(data["sigma"], dtype=torch.float))
        return ReferencePosterior(name, eight_schools, args, columns, draws.float())
    if name == "low_dim_gauss_mix":
        data, columns, draws = _read(root, "low_dim_gauss_mix-low_dim_gauss_mix")
        index = {c: i for i, c in enumerate(columns)}
        swapped = draws.clone()
        for a, b in (("mu[1]", "mu[2]"), ("sigma[1]", "sigma[2]")):
            swapped[:, index[a]], swapped[:, index[b]] = draws[:, index[b]], draws[:, index[a]]
        swapped[:, index["theta"]] = 1 - draws[:, index["theta"]]
        args = (tensor(data["y"], dtype=torch.float),)
        return ReferencePosterior(
            name, low_dim_gauss_mix, args, columns, torch.cat((draws, swapped)).float()
        )
    if name == "kilpisjarvi":
        data, columns, draws = _read(root, "kilpisjarvi_mod-kilpisjarvi")
        prior = (data["pmualpha"], data["psalpha"], data["pmubeta"], data["psbeta"])
        # alpha and beta correlate at -0.99999 with x near 4000: float32 cannot resolve it.
        args = (
            tensor(data["x"], dtype=torch.float64),
            tensor(data["y"], dtype=torch.float64),
            prior,
        )
        return ReferencePosterior(name, kilpisjarvi, args, columns, draws.double())
    if name == "arK":
        data, columns, draws = _read(root, "arK-arK")
        args = (tensor(data["y"], dtype=torch.float), int(data["K"]))
        return ReferencePosterior(name, ar_k, args, columns, draws.float())
    if name == "gp_pois_regr":
        data, columns, draws = _read(root, "gp_pois_regr-gp_pois_regr")
        args = (tensor(data["x"], dtype=torch.float64), tensor(data["k"], dtype=torch.float64))
        return ReferencePosterior(name, gp_pois_regr, args, columns, draws.double())
    raise ValueError(f"name must be one of {POSTERIORS}, got {name!r}")
