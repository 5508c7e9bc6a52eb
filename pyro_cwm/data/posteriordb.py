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
from pyro.distributions import constraints
from torch import Tensor
from torch.distributions import biject_to

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


def _flat_real(name: str, shape: tuple[int, ...], one: Tensor) -> Tensor:
    """A real site (event shape ``shape``) with a flat (improper) prior: proper wide Normal
    base, cancelled. ``one`` is a scalar 1 of the model's dtype."""
    base = dist.Normal(0.0 * one, 10.0 * one).expand(shape).to_event(len(shape))
    value = pyro.sample(name, base)
    pyro.factor(f"{name}_flat_prior", -base.log_prob(value))
    return value


class _PositiveOrderedBase(dist.TransformedDistribution):
    """A transformed distribution that declares its support positive ordered (its transform
    maps onto it), so that guides and initializers use the ordered bijection."""

    support = constraints.positive_ordered_vector


def _positive_ordered(name: str, loc: tuple[float, float], one: Tensor) -> Tensor:
    """A positive ordered pair (0 < x_1 < x_2) with Stan's prior ``N(x_k | loc_k, 1)``
    on the constrained values (no truncation terms): a proper base on the ordered pair
    (a standard Normal pushed through Pyro's positive-ordered bijection), whose density a
    ``pyro.factor`` swaps for the Normals."""
    base = _PositiveOrderedBase(
        dist.Normal(0.0 * one, one).expand([2]).to_event(1),
        biject_to(constraints.positive_ordered_vector),
    )
    value = pyro.sample(name, base)
    prior = dist.Normal(torch.tensor(loc, dtype=one.dtype), one).log_prob(value).sum(-1)
    pyro.factor(f"{name}_prior", prior - base.log_prob(value))
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


def diamonds(x: Tensor, y: Tensor) -> None:
    """brms linear regression of log price on 24 centered predictors (diamonds).

    ``x`` (N, 24) are the predictors without the column of ones (centered here), ``y``
    (N,). b ~ N(0, 1), Intercept ~ StudentT(3, 8, 10), sigma ~ HalfStudentT(3, 10),
    y ~ N(Intercept + x_c b, sigma). Nearly collinear columns make the posterior badly
    conditioned (correlation condition number ~2.6e5): pass float64.
    """
    one = torch.ones((), dtype=x.dtype)
    xc = x - x.mean(0)
    b = pyro.sample("b", dist.Normal(0.0 * one, one).expand([x.shape[1]]).to_event(1))
    intercept = pyro.sample("Intercept", dist.StudentT(3.0 * one, 8.0 * one, 10.0 * one))
    sigma = pyro.sample(
        "sigma", dist.FoldedDistribution(dist.StudentT(3.0 * one, 0.0 * one, 10.0 * one))
    )
    # One event of N observations (as in gp_pois_regr): b has no slot for a data plate, so
    # the linear predictor is a plain product, (..., 24) @ (24, N).
    mean = intercept[..., None] + b @ xc.T
    pyro.sample("y", dist.Normal(mean, sigma[..., None]).to_event(1), obs=y)


def nes(x: Tensor, y: Tensor) -> None:
    """Linear regression of party identification on 9 predictors (NES 2000).

    ``x`` (N, 9) has a first column of ones, ``y`` (N,); flat priors on beta and sigma.
    """
    one = torch.ones((), dtype=x.dtype)
    beta = _flat_real("beta", (x.shape[1],), one)
    sigma = _flat_positive("sigma", one)
    mean = beta @ x.T  # one event of N observations, as in diamonds
    pyro.sample("y", dist.Normal(mean, sigma[..., None]).to_event(1), obs=y)


def _pad(x: Tensor, n: int, dims: int) -> Tensor:
    """``x`` with ``n`` size-1 dimensions inserted before its last ``dims``."""
    return x.reshape(x.shape[: x.dim() - dims] + (1,) * n + x.shape[x.dim() - dims :])


def _stan_hmm(
    name: str, log_transition: Tensor, emission: Callable[[int], dist.Distribution], obs: Tensor
) -> None:
    """Observe ``obs`` (T, *event) under a hidden Markov model with the states summed out,
    as Stan's forward algorithm writes it: step 1 has weight 1 per state (no initial
    distribution), then gamma_t(k) = logsumexp_j(gamma_{t-1}(j) + log_transition[j, k])
    + log emission_k(obs_t).

    ``log_transition`` (..., K, K) is (from, to); ``emission(n)`` is the emission
    distribution with batch shape (..., *[1] * n, K). Pyro's ``DiscreteHMM`` (a parallel
    scan) draws a state, transitions, then emits: so step 1's emission log-weights gamma_1
    serve as its (normalized) initial logits over steps 2..T, and a ``pyro.factor`` adds
    back logsumexp(gamma_1).
    """
    first = emission(0).log_prob(obs[0])  # gamma_1, (..., K)
    pyro.factor(f"{name}_first", first.logsumexp(-1))
    hmm = dist.DiscreteHMM(first, log_transition[..., None, :, :], emission(1))
    pyro.sample(name, hmm, obs=obs[1:])


def hmm_drive(u: Tensor, v: Tensor, alpha: Tensor) -> None:
    """Two-state HMM of a basketball drive (hmm_drive_0) with the states summed out.

    Observations per step t: ``u`` (T,) and ``v`` (T,), Exponential with rates
    ``phi[k]`` and ``lambda[k]`` in state k. Rows of the transition matrix theta1,
    theta2 ~ Dirichlet(alpha[k]) (``alpha`` (2, 2)); phi and lambda are positive ordered
    with N(0, 1), N(3, 1) priors. The likelihood is Stan's forward algorithm.
    """
    one = torch.ones((), dtype=u.dtype)
    theta1 = pyro.sample("theta1", dist.Dirichlet(alpha[0].to(u.dtype)))
    theta2 = pyro.sample("theta2", dist.Dirichlet(alpha[1].to(u.dtype)))
    phi = _positive_ordered("phi", (0.0, 3.0), one)
    lam = _positive_ordered("lambda", (0.0, 3.0), one)
    transition = torch.stack((theta1, theta2), -2).log()  # (..., from, to)
    rates = torch.stack((phi, lam), -1)  # (..., state, observation)
    obs = torch.stack((u, v), -1)  # (T, 2)
    _stan_hmm("obs", transition, lambda n: dist.Exponential(_pad(rates, n, 2)).to_event(1), obs)


def hmm_example(y: Tensor) -> None:
    """Two-state Gaussian HMM (hmm_example), y_t ~ N(mu_{z_t}, 1), the states summed out.

    Rows theta1, theta2 of the transition matrix are uniform on the simplex; mu is
    positive ordered with N(3, 1), N(10, 1) priors. The likelihood is Stan's forward
    algorithm (no initial distribution).
    """
    one = torch.ones((), dtype=y.dtype)
    flat = torch.ones(2, dtype=y.dtype)
    theta1 = pyro.sample("theta1", dist.Dirichlet(flat))
    theta2 = pyro.sample("theta2", dist.Dirichlet(flat))
    mu = _positive_ordered("mu", (3.0, 10.0), one)
    transition = torch.stack((theta1, theta2), -2).log()
    _stan_hmm("y", transition, lambda n: dist.Normal(_pad(mu, n, 1), one), y)


def garch11(y: Tensor, sigma1: float) -> None:
    """GARCH(1, 1): y_t ~ N(mu, sigma_t), sigma_1 = ``sigma1``, sigma_t^2 = alpha0 +
    alpha1 (y_{t-1} - mu)^2 + beta1 sigma_{t-1}^2.

    Flat priors on mu, alpha0 > 0, 0 < alpha1 < 1 and 0 < beta1 < 1 - alpha1. beta1's
    bound depends on alpha1, so the sample site is ``beta1_fraction`` = beta1 / (1 -
    alpha1) ~ Uniform(0, 1) with the Jacobian log(1 - alpha1) as a factor; ``beta1`` is a
    deterministic site.
    """
    one = torch.ones((), dtype=y.dtype)
    mu = _flat_real("mu", (), one)
    alpha0 = _flat_positive("alpha0", one)
    alpha1 = pyro.sample("alpha1", dist.Uniform(0 * one, one))
    fraction = pyro.sample("beta1_fraction", dist.Uniform(0 * one, one))
    pyro.factor("beta1_flat_prior", torch.log1p(-alpha1))
    beta1 = pyro.deterministic("beta1", fraction * (1 - alpha1))
    variance = [sigma1**2 * one.expand(torch.broadcast_shapes(mu.shape, beta1.shape))]
    for t in range(1, y.shape[0]):
        variance.append(alpha0 + alpha1 * (y[t - 1] - mu) ** 2 + beta1 * variance[-1])
    scale = torch.stack(variance, -1).sqrt()
    pyro.sample("y", dist.Normal(mu[..., None], scale).to_event(1), obs=y)


def blr(x: Tensor, y: Tensor) -> None:
    """Bayesian linear regression (sblrc-blr): beta ~ N(0, 10)^D, sigma ~ HalfNormal(10),
    y ~ N(x beta, sigma), ``x`` (N, D) on a large scale (posterior sds ~1e-3): pass float64.
    """
    one = torch.ones((), dtype=x.dtype)
    beta = pyro.sample("beta", dist.Normal(0 * one, 10 * one).expand([x.shape[1]]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(10 * one))
    pyro.sample("y", dist.Normal(beta @ x.T, sigma[..., None]).to_event(1), obs=y)


def _read(root: Path, folder: str) -> tuple[dict, list[str], Tensor]:
    data = json.loads((root / folder / "data.json").read_text())
    chains = json.loads((root / folder / "draws.json").read_text())
    columns = list(chains[0])
    draws = torch.tensor([[v for column in columns for v in [chain[column]]] for chain in chains])
    # (chains, columns, draws) -> (chains * draws, columns)
    draws = draws.permute(0, 2, 1).reshape(-1, len(columns))
    return data, columns, draws


POSTERIORS = [
    "eight_schools",
    "low_dim_gauss_mix",
    "kilpisjarvi",
    "arK",
    "gp_pois_regr",
    "diamonds",
    "nes",
    "hmm_drive_0",
    "hmm_example",
    "garch11",
    "blr",
]


# Posteriors whose model takes data fields as they are, in float64: posteriordb file stem,
# model, fields.
_FLOAT64_FIELDS = {
    "gp_pois_regr": ("gp_pois_regr-gp_pois_regr", gp_pois_regr, ("x", "k")),
    "hmm_drive_0": ("bball_drive_event_0-hmm_drive_0", hmm_drive, ("u", "v", "alpha")),
    "hmm_example": ("hmm_example-hmm_example", hmm_example, ("y",)),
    "blr": ("sblrc-blr", blr, ("X", "y")),
}


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
    if name in _FLOAT64_FIELDS:
        stem, model, fields = _FLOAT64_FIELDS[name]
        data, columns, draws = _read(root, stem)
        args = tuple(tensor(data[field], dtype=torch.float64) for field in fields)
        return ReferencePosterior(name, model, args, columns, draws.double())
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
    if name == "diamonds":
        data, columns, draws = _read(root, "diamonds-diamonds")
        x = tensor(data["X"], dtype=torch.float64)[:, 1:]
        return ReferencePosterior(
            name, diamonds, (x, tensor(data["Y"], dtype=torch.float64)), columns, draws.double()
        )
    if name == "nes":
        data, columns, draws = _read(root, "nes2000-nes")
        age = tensor(data["age_discrete"])
        predictors = [
            torch.ones(len(age)),
            tensor(data["real_ideo"]),
            tensor(data["race_adj"]),
            age == 2,
            age == 3,
            age == 4,
            tensor(data["educ1"]),
            tensor(data["gender"]),
            tensor(data["income"]),
        ]
        x = torch.stack([p.to(torch.float64) for p in predictors], -1)
        args = (x, tensor(data["partyid7"], dtype=torch.float64))
        return ReferencePosterior(name, nes, args, columns, draws.double())
    if name == "garch11":
        data, columns, draws = _read(root, "garch-garch11")
        args = (tensor(data["y"], dtype=torch.float64), float(data["sigma1"]))
        return ReferencePosterior(name, garch11, args, columns, draws.double())
    raise ValueError(f"name must be one of {POSTERIORS}, got {name!r}")
