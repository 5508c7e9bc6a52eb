"""Fitting the Bayesian Gaussian mixture: SVI, NUTS, MAP-EM, and cluster assignments.

The model is [`BayesianGMM`][pyro_cwm.models.BayesianGMM]; its assignment site is enumerated, so
every method here works on the marginal posterior of the globals

    p(w, mu, sigma, L | x)  propto  p(w, mu, sigma, L) prod_n sum_k w_k N(x_n | mu_k, Sigma_k).

That posterior is invariant under the K! permutations of the component labels: a sampler
that mixes well visits K! copies of every mode, and independent chains (or fits) land in
different copies. [`align_labels`][inference.align_labels] relabels draws to a common reference and
reports the permutations it applied, so the switching is shown, not hidden.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import pyro
import pyro.optim
import pyro.poutine as poutine
import torch
from pyro.distributions import constraints
from pyro.distributions.transforms import biject_to
from pyro.infer import MCMC, NUTS, TraceEnum_ELBO, infer_discrete
from pyro.infer.autoguide import AutoDelta, AutoNormal, init_to_value
from torch import Tensor

from inference.em.kmeans import kmeans
from inference.progress import Progress, emit, interactive
from inference.svi import fit_svi
from pyro_cwm.models.bayesian_gmm import BayesianGMM
from pyro_cwm.nn.checks import check_positive_int

__all__ = [
    "BayesianGMMSVIFit",
    "BayesianGMMNUTSRun",
    "BayesianGMMMAPFit",
    "bayesian_gmm_init",
    "enumerated_responsibilities",
    "fit_bayesian_gmm_map_em",
    "fit_bayesian_gmm_svi",
    "infer_assignments",
    "posterior_responsibilities",
    "sample_bayesian_gmm_nuts",
]


@contextlib.contextmanager
def _seeded(seed: int | None):
    """Seed torch's RNG for the block and restore the caller's RNG state afterwards."""
    if seed is None:
        yield
        return
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.random.set_rng_state(state)


def _check_model(model) -> BayesianGMM:
    if not isinstance(model, BayesianGMM):
        raise TypeError(f"model must be a BayesianGMM, got {type(model).__name__}")
    return model


def _check_data(model: BayesianGMM, data) -> Tensor:
    data = model.check_data(data)
    if data.shape[0] < model.num_components:
        raise ValueError(
            f"data has {data.shape[0]} rows, fewer than num_components ({model.num_components})"
        )
    return data


# --------------------------------------------------------------------------- initialization


def bayesian_gmm_init(model: BayesianGMM, data: Tensor, seed: int | None = 0) -> dict[str, Tensor]:
    """Starting values of the globals from k-means (k-means++ seeding, Lloyd iterations).

    ``weights`` are the cluster proportions (plus one pseudo-count each), ``locs`` the
    centers, ``scales`` the per-coordinate standard deviations inside each cluster (the
    overall ones for clusters of fewer than two points) and ``corr_cholesky`` the identity.
    Different seeds can give the same clusters under different labels.

    Returns:
        ``{site: tensor}`` with the model's site shapes, on the device and dtype of ``data``.

    Raises:
        ValueError: for bad data, or fewer rows than components.
    """
    model = _check_model(model)
    data = _check_data(model, data)
    K, d = model.num_components, model.dim
    generator = torch.Generator().manual_seed(0 if seed is None else seed)
    centers, labels = kmeans(data, K, generator)
    counts = torch.bincount(labels, minlength=K).to(data.dtype)
    overall = data.std(0) if data.shape[0] > 1 else torch.ones_like(data[0])
    overall = torch.where(overall > 0, overall, torch.ones_like(overall))
    scales = overall.expand(K, d).clone()
    for k in range(K):
        members = data[labels == k]
        if members.shape[0] >= 2:
            spread = members.std(0)
            scales[k] = torch.where(spread > 1e-3 * overall, spread, overall)
    init = {
        "weights": (counts + 1) / (counts.sum() + K),
        "locs": centers.clone(),
        "scales": scales,
    }
    if model.has_correlations:
        init["corr_cholesky"] = torch.eye(d, dtype=data.dtype, device=data.device).expand(K, d, d)
    return init


def _init_for(model: BayesianGMM, data: Tensor, init, seed: int | None) -> dict[str, Tensor]:
    if init is None:
        return bayesian_gmm_init(model, data, seed=seed)
    if not isinstance(init, dict):
        raise TypeError(f"init must be a dict of site values or None, got {type(init).__name__}")
    init = {k: torch.as_tensor(v, dtype=data.dtype, device=data.device) for k, v in init.items()}
    model.check_params(init)
    return {name: init[name] for name in model.global_sites}


# --------------------------------------------------------------------------- SVI


@dataclass
class BayesianGMMSVIFit:
    """Result of [`fit_bayesian_gmm_svi`][inference.fit_bayesian_gmm_svi].

    Attributes:
        guide: the fitted autoguide over the globals (``AutoDelta`` or ``AutoNormal``).
        params: the guide's point estimate of every global site (``guide.median()``).
        history: the history returned by [`fit_svi`][inference.fit_svi] (``loss`` = negative
            ELBO).
    """

    guide: Any
    params: dict[str, Tensor]
    history: dict[str, Any]


def fit_bayesian_gmm_svi(
    model: BayesianGMM,
    data: Tensor,
    guide: str = "delta",
    *,
    num_steps: int = 1000,
    lr: float = 0.05,
    init: dict[str, Tensor] | None = None,
    init_scale: float = 0.05,
    seed: int | None = 0,
    progress: bool = False,
    **options,
) -> BayesianGMMSVIFit:
    """Fit the globals by SVI with ``TraceEnum_ELBO``: the assignments are summed out exactly.

    The guide covers only the globals (the model is wrapped in ``poutine.block(expose=...)``
    of [`BayesianGMM.global_sites`][pyro_cwm.models.BayesianGMM.global_sites], as in Pyro's
    GMM tutorial): ``guide="delta"`` gives MAP estimation (``AutoDelta``; the same objective
    as [`fit_bayesian_gmm_map_em`][inference.fit_bayesian_gmm_map_em]), ``guide="normal"`` a
    mean-field Gaussian in the unconstrained space (``AutoNormal``).

    Args:
        model: the [`BayesianGMM`][pyro_cwm.models.BayesianGMM].
        data: observations of shape (N, d).
        num_steps: number of Adam steps.
        lr: Adam's learning rate.
        init: starting values of the globals (default:
            [`bayesian_gmm_init`][inference.bayesian_gmm.bayesian_gmm_init]).
        init_scale: initial standard deviation of ``AutoNormal``.
        seed: seed of the initialization and of the ELBO's draws (None: the global RNG).
        progress: show progress (a bar when interactive, else one summary line).
        **options (Any): passed to [`fit_svi`][inference.fit_svi] (``patience``, ``checkpoint``,
            ...).

    Raises:
        ValueError: for bad data or options; FloatingPointError if the fit diverges.

    Note: this clears Pyro's parameter store.
    """
    model = _check_model(model)
    data = _check_data(model, data)
    if guide not in ("delta", "normal"):
        raise ValueError(f"guide must be 'delta' or 'normal', got {guide!r}")
    with _seeded(seed):
        values = _init_for(model, data, init, seed)
        pyro.clear_param_store()
        exposed = poutine.block(model, expose=list(model.global_sites))
        if guide == "delta":
            autoguide = AutoDelta(exposed, init_loc_fn=init_to_value(values=values))
        else:
            autoguide = AutoNormal(
                exposed, init_loc_fn=init_to_value(values=values), init_scale=init_scale
            )
        history = fit_svi(
            model,
            autoguide,
            data,
            loss=TraceEnum_ELBO(max_plate_nesting=1),
            num_steps=num_steps,
            optim=pyro.optim.Adam({"lr": lr}),
            progress=progress,
            **options,
        )
    with torch.no_grad():
        params = {name: value.detach() for name, value in autoguide.median(data).items()}
    return BayesianGMMSVIFit(autoguide, params, history)


# --------------------------------------------------------------------------- NUTS


@dataclass
class BayesianGMMNUTSRun:
    """Result of [`sample_bayesian_gmm_nuts`][inference.sample_bayesian_gmm_nuts].

    Attributes:
        samples: ``{site: tensor (num_chains, num_samples, *site_shape)}`` of the globals,
            with their labels as sampled (not aligned: see
            [`align_labels`][inference.align_labels]).
        runs: the ``pyro.infer.MCMC`` object of every chain.
        inits: the starting values of every chain.
        divergences: number of divergent transitions after warm-up, per chain.
    """

    samples: dict[str, Tensor]
    runs: list[MCMC]
    inits: list[dict[str, Tensor]]
    divergences: list[int] = field(default_factory=list)


def sample_bayesian_gmm_nuts(
    model: BayesianGMM,
    data: Tensor,
    *,
    num_samples: int = 500,
    warmup_steps: int = 500,
    num_chains: int = 1,
    init: dict[str, Tensor] | list[dict[str, Tensor]] | None = None,
    seed: int | None = 0,
    target_accept_prob: float = 0.8,
    max_tree_depth: int = 10,
    jit_compile: bool = False,
    progress: bool = False,
) -> BayesianGMMNUTSRun:
    """Sample the marginal posterior of the globals with NUTS (assignments enumerated out).

    Chains run one after the other in this process, chain ``c`` with seed ``seed + c``.
    Each starts from ``init`` (one dict for all chains, or a list of one per chain) or, by
    default, from [`bayesian_gmm_init`][inference.bayesian_gmm.bayesian_gmm_init] with
    k-means seed ``seed + c``: different chains may start, and stay, in different label
    permutations of the same mode.

    Returns:
        a [`BayesianGMMNUTSRun`][inference.bayesian_gmm.BayesianGMMNUTSRun];
        ``samples[site]`` has shape (num_chains, num_samples, *site_shape).

    Raises:
        ValueError: for bad data, counts, or a list ``init`` of the wrong length.
    """
    model = _check_model(model)
    data = _check_data(model, data)
    check_positive_int("num_samples", num_samples)
    check_positive_int("warmup_steps", warmup_steps, allow_zero=True)
    check_positive_int("num_chains", num_chains)
    if isinstance(init, (list, tuple)) and len(init) != num_chains:
        raise ValueError(f"init has {len(init)} entries for num_chains={num_chains}")
    runs, inits, divergences = [], [], []
    chains: dict[str, list[Tensor]] = {name: [] for name in model.global_sites}
    show_bar, started = progress and interactive(), time.perf_counter()
    for chain in range(num_chains):
        chain_seed = None if seed is None else seed + chain
        chain_init = init[chain] if isinstance(init, (list, tuple)) else init
        with _seeded(chain_seed):
            values = _init_for(model, data, chain_init, chain_seed)
            kernel = NUTS(
                model,
                max_plate_nesting=1,
                target_accept_prob=target_accept_prob,
                max_tree_depth=max_tree_depth,
                jit_compile=jit_compile,
                ignore_jit_warnings=True,
                init_strategy=init_to_value(values=values),
            )
            mcmc = MCMC(
                kernel,
                num_samples=num_samples,
                warmup_steps=warmup_steps,
                disable_progbar=not show_bar,
            )
            with warnings.catch_warnings():
                # Pyro's jit_compile uses torch.jit.trace, which torch now flags as deprecated.
                warnings.filterwarnings(
                    "ignore", message=".*torch.jit.trace.*", category=DeprecationWarning
                )
                mcmc.run(data)
        draws = mcmc.get_samples()
        for name in model.global_sites:
            chains[name].append(draws[name].detach())
        runs.append(mcmc)
        inits.append(values)
        divergences.append(len(mcmc.diagnostics()["divergences"]["chain 0"]))
    samples = {name: torch.stack(value) for name, value in chains.items()}
    if progress and not show_bar:  # Pyro's bar would write a line per refresh into a log
        emit(
            f"sample_bayesian_gmm_nuts: {num_chains} chains in {time.perf_counter() - started:.1f}"
            f" s, samples {num_samples}, divergences {sum(divergences)}"
        )
    return BayesianGMMNUTSRun(samples, runs, inits, divergences)


# --------------------------------------------------------------------------- MAP-EM


@dataclass
class BayesianGMMMAPFit:
    """Result of [`fit_bayesian_gmm_map_em`][inference.fit_bayesian_gmm_map_em].

    Attributes:
        params: the MAP estimate ``{site: tensor}`` (the model's site shapes).
        log_posterior: ``log p(data, params)`` after the initialization and after every
            iteration (non-decreasing up to rounding).
        converged: whether the relative change fell below ``tol``.
        num_iterations: number of EM iterations run.
    """

    params: dict[str, Tensor]
    log_posterior: list[float]
    converged: bool
    num_iterations: int


def _diag_variance(n_k: Tensor, scatter: Tensor, s: float) -> Tensor:
    """Maximizer over v = sigma^2 of -n log sigma - S / (2 sigma^2) + log HalfCauchy(sigma; s).

    Setting the derivative to zero gives (n + 2) v^2 - (S - n s^2) v - S s^2 = 0, whose only
    positive root is the maximum (the roots' product is negative).
    """
    b = scatter - n_k * s**2
    v = (b + torch.sqrt(b**2 + 4 * (n_k + 2) * scatter * s**2)) / (2 * (n_k + 2))
    return v.clamp_min(torch.finfo(v.dtype).tiny)


def _full_cov_objective(
    model: BayesianGMM, n_k: Tensor, scatter: Tensor, scales: Tensor, corr: Tensor
) -> Tensor:
    """sum_k [sum_n r_nk log N(x_n | mu_k, Sigma_k)] + log priors of scales and correlations.

    ``scatter`` (K, d, d) is sum_n r_nk (x_n - mu_k)(x_n - mu_k)^T at the current means.
    """
    d = model.dim
    tril = scales.unsqueeze(-1) * corr
    half_log_det = tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    inv_scatter = torch.linalg.solve_triangular(tril, scatter, upper=False)
    quad = torch.linalg.solve_triangular(tril, inv_scatter.transpose(-1, -2), upper=False)
    trace = quad.diagonal(dim1=-2, dim2=-1).sum(-1)
    log_lik = -0.5 * n_k * d * math.log(2 * math.pi) - n_k * half_log_det - 0.5 * trace
    priors = model.priors(dtype=scales.dtype, device=scales.device)
    log_prior = priors["scales"].log_prob(scales) + priors["corr_cholesky"].log_prob(corr)
    return (log_lik + log_prior).sum()


def _full_cov_step(
    model: BayesianGMM,
    n_k: Tensor,
    scatter: Tensor,
    scales: Tensor,
    corr: Tensor,
    m_step_iters: int,
) -> tuple[Tensor, Tensor]:
    """A few L-BFGS (strong Wolfe) steps on the covariance part of the M-step objective.

    The step is kept only if it does not lower the objective, so EM stays monotone.
    """
    to_corr = biject_to(constraints.corr_cholesky)
    u_scale = scales.log().clone().requires_grad_(True)
    u_corr = to_corr.inv(corr).clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [u_scale, u_corr],
        lr=1.0,
        max_iter=m_step_iters,
        tolerance_grad=1e-12,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        loss = -_full_cov_objective(model, n_k, scatter, u_scale.exp(), to_corr(u_corr))
        loss.backward()
        return loss

    with torch.enable_grad():
        before = -closure().item()
        optimizer.step(closure)
    with torch.no_grad():
        new_scales, new_corr = u_scale.exp(), to_corr(u_corr)
        after = _full_cov_objective(model, n_k, scatter, new_scales, new_corr).item()
    if math.isfinite(after) and after >= before:
        return new_scales.detach(), new_corr.detach()
    return scales, corr


def fit_bayesian_gmm_map_em(
    model: BayesianGMM,
    data: Tensor,
    *,
    init: dict[str, Tensor] | None = None,
    max_iter: int = 500,
    tol: float = 1e-10,
    m_step_iters: int = 20,
    seed: int | None = 0,
    progress: bool = False,
) -> BayesianGMMMAPFit:
    """MAP estimate of the globals by EM (an ECM algorithm: conditional M-steps).

    The objective is the log posterior ``log p(data, params)`` of
    [`BayesianGMM.log_joint`][pyro_cwm.models.BayesianGMM.log_joint] in the model's
    constrained parametrization (what ``AutoDelta`` maximizes). Every iteration takes the
    exact E-step ``r_nk = p(z_n = k | x_n, params)`` and then maximizes the expected
    complete log joint
    ``Q = sum_nk r_nk [log w_k + log N(x_n | mu_k, Sigma_k)] + log p(params)`` one block at
    a time, each block given the others:

    - weights, closed form: ``w_k = (N_k + alpha - 1) / (N + K (alpha - 1))``;
    - means given the covariances, closed form:
      ``(N_k Sigma_k^-1 + tau^-2 I) mu_k = Sigma_k^-1 sum_n r_nk x_n + tau^-2 m``;
    - covariances given the means: for ``"diag"`` in closed form (the positive root of a
      quadratic in sigma^2, see ``_diag_variance``); for ``"full"`` (HalfCauchy scales and
      LKJ correlations have no conjugate form) ``m_step_iters`` L-BFGS steps with a strong
      Wolfe line search in the unconstrained space, kept only if they do not lower Q.

    No block lowers Q, so the log posterior does not decrease (generalized EM).

    Args:
        init: starting values (default:
            [`bayesian_gmm_init`][inference.bayesian_gmm.bayesian_gmm_init] with ``seed``).
        max_iter: maximum number of iterations.
        tol: stop when the increase of the log posterior is below ``tol * (1 + |value|)``.
        m_step_iters: L-BFGS iterations per M-step (full covariance only).
        progress: show progress (a bar when interactive, else one summary line).

    Raises:
        ValueError: for bad data or options, or a Dirichlet concentration below 1 (the
            posterior density is then unbounded at the boundary of the simplex and has no
            MAP estimate).
        FloatingPointError: if the log posterior becomes non-finite.
    """
    model = _check_model(model)
    data = _check_data(model, data)
    check_positive_int("max_iter", max_iter)
    check_positive_int("m_step_iters", m_step_iters)
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    if model.concentration < 1:
        raise ValueError(
            f"MAP-EM needs model.concentration >= 1, got {model.concentration}: below 1 the "
            "Dirichlet density is unbounded at the boundary and there is no MAP estimate"
        )
    K, d = model.num_components, model.dim
    alpha, tau = model.concentration, model.loc_scale
    prior_mean = model.loc_mean.to(dtype=data.dtype, device=data.device)
    eye = torch.eye(d, dtype=data.dtype, device=data.device)
    tiny = torch.finfo(data.dtype).tiny
    with torch.no_grad():
        params = {k: v.clone() for k, v in _init_for(model, data, init, seed).items()}
        history = [model.log_joint(data, params).item()]
        if not math.isfinite(history[0]):
            raise FloatingPointError("the log posterior at the initial values is not finite")
        converged = False
        bar = Progress(range(max_iter), "MAP-EM", enabled=progress)
        iteration = 0
        for iteration in bar:  # noqa: B007 (used after the loop)
            resp = model.responsibilities(data, params)  # (N, K)
            n_k = resp.sum(0)
            weights = (n_k + alpha - 1) / (n_k.sum() + K * (alpha - 1))
            weights = weights.clamp_min(tiny)
            params["weights"] = weights / weights.sum()
            # Means given the covariances.
            if model.has_correlations:
                tril = model.scale_tril(params)
                precision = torch.cholesky_inverse(tril)
            else:
                precision = torch.diag_embed(params["scales"].pow(-2))
            sums = resp.T @ data  # (K, d)
            lhs = n_k[:, None, None] * precision + eye / tau**2
            rhs = (precision @ sums.unsqueeze(-1)).squeeze(-1) + prior_mean / tau**2
            params["locs"] = torch.linalg.solve(lhs, rhs)
            # Covariances given the means.
            centered = data.unsqueeze(0) - params["locs"].unsqueeze(1)  # (K, N, d)
            weighted = resp.T.unsqueeze(-1) * centered
            if model.has_correlations:
                scatter = weighted.transpose(-1, -2) @ centered  # (K, d, d)
                params["scales"], params["corr_cholesky"] = _full_cov_step(
                    model, n_k, scatter, params["scales"], params["corr_cholesky"], m_step_iters
                )
            else:
                scatter = (weighted * centered).sum(1)  # (K, d)
                variance = _diag_variance(n_k[:, None], scatter, model.scale_scale)
                params["scales"] = variance.sqrt()
            value = model.log_joint(data, params).item()
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"MAP-EM: the log posterior is {value} at iteration {iteration}"
                )
            history.append(value)
            bar.set_postfix(log_posterior=f"{value:.6g}")
            if abs(value - history[-2]) <= tol * (1 + abs(value)):
                converged = True
                break
        bar.close()
    return BayesianGMMMAPFit(params, history, converged, iteration + 1)


# --------------------------------------------------------------------------- assignments


def infer_assignments(
    model: BayesianGMM,
    data: Tensor,
    params: dict[str, Tensor],
    *,
    temperature: int = 0,
    seed: int | None = 0,
) -> Tensor:
    """Cluster assignments (N,) by ``pyro.infer.infer_discrete`` given values of the globals.

    ``temperature=0`` gives the most probable assignment of every point (the argmax of its
    responsibilities), ``temperature=1`` a draw from ``p(z | x, params)``.

    Raises:
        ValueError: for bad data or params, or a temperature other than 0 or 1.
    """
    model = _check_model(model)
    data = model.check_data(data)
    model.check_params(params)
    if temperature not in (0, 1):
        raise ValueError(f"temperature must be 0 or 1, got {temperature}")
    conditioned = poutine.condition(model, data={k: params[k] for k in model.global_sites})
    discrete = infer_discrete(conditioned, first_available_dim=-2, temperature=temperature)
    with _seeded(seed), torch.no_grad():
        trace = poutine.trace(discrete).get_trace(data)
    return trace.nodes["assignment"]["value"]


def enumerated_responsibilities(
    model: BayesianGMM, data: Tensor, params: dict[str, Tensor]
) -> Tensor:
    """``p(z_n = k | x_n, params)`` (N, K) from Pyro's enumeration (``compute_marginals``).

    The same numbers as
    [`BayesianGMM.responsibilities`][pyro_cwm.models.BayesianGMM.responsibilities], computed
    by Pyro's variable elimination instead of by hand.
    """
    model = _check_model(model)
    data = model.check_data(data)
    model.check_params(params)
    conditioned = poutine.condition(model, data={k: params[k] for k in model.global_sites})

    def guide(*args, **kwargs):
        pass

    with torch.no_grad():
        marginals = TraceEnum_ELBO(max_plate_nesting=1).compute_marginals(conditioned, guide, data)
    return marginals["assignment"].probs


def posterior_responsibilities(
    model: BayesianGMM, data: Tensor, samples: dict[str, Tensor]
) -> Tensor:
    """Posterior mean responsibilities ``E[p(z_n = k | x_n, params) | data]``: shape (N, K).

    ``samples`` holds draws with any leading dims (e.g. (chains, draws)); the average is
    meaningful only if their labels agree: pass the ``samples`` of a
    [`LabelAlignment`][inference.LabelAlignment].
    """
    model = _check_model(model)
    batch = samples["locs"].shape[:-2]
    flat = {
        name: samples[name].reshape((-1,) + samples[name].shape[len(batch) :])
        if name != "weights"
        else samples[name].reshape(-1, model.num_components)
        for name in model.global_sites
    }
    with torch.no_grad():
        return model.responsibilities(data, flat).mean(0)
