"""Expectation-maximization loops: Gaussian mixtures (every family) and mixtures of experts.

An EM iteration is one pass over the data in chunks: the E-step of a chunk gives its
responsibilities, which are folded at once into additive sufficient statistics
(``inference.gmm_families.SufficientStatistics``); the M-step turns the summed
statistics into new parameters. Nothing of size (N, K) is kept, so the data can be a
memory-mapped array larger than memory, and a data-parallel version only has to sum the
statistics across devices (one all-reduce) before the M-step.

- ``run_em``: full-batch EM (exact), over chunks from a re-iterable source.
- ``stepwise_statistics``: stepwise (online) EM, Cappé & Moulines (2009): running
  statistics ``s <- (1 - eta_t) s + eta_t s(batch)`` after each minibatch, then an M-step;
  [`GaussianMixtureEM.partial_fit`][inference.GaussianMixtureEM.partial_fit] uses it.
- [`fit_experts_em`][inference.fit_experts_em]: variational EM of a
  [`MixtureOfExperts`][pyro_cwm.models.MixtureOfExperts] (responsibilities, the experts' Gaussian
  posteriors, the gate, the hyperparameters).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from inference.gmm_families import (
    ILL_DEFINED,
    GaussianMixtureParameters,
    SufficientStatistics,
    centered_joint_log_probs,
    centered_statistics,
    chunk_statistics,
    joint_log_probs,
    m_step,
    second_order_features,
)


def weighted_log_probs(
    x: Tensor, params: GaussianMixtureParameters, kind: str, centered: bool = False
) -> Tensor:
    """``log pi_k + log N(x_n; mu_k, Sigma_k)`` for a chunk ``x`` (n, d): (n, K)."""
    if centered:
        return centered_joint_log_probs(x, params, kind)[0].T
    return joint_log_probs(second_order_features(x, kind), params, kind).T


def _responsibilities(log_joint: Tensor) -> tuple[Tensor, Tensor]:
    """Responsibilities (K, n) and log-normalizers (n,) from joint log-densities (K, n).

    One exp pass serves both (``log_joint`` is overwritten).
    """
    top = log_joint.amax(0, keepdim=True)  # amax: max also computes indices, slowly
    resp = log_joint.sub_(top).exp_()
    total_mass = resp.sum(0, keepdim=True)
    resp /= total_mass
    return resp, (top + total_mass.log()).squeeze(0)


def _summed(chunks: Iterable, chunk_statistics_of) -> SufficientStatistics:
    total = None
    for chunk in chunks:
        stats = chunk_statistics_of(chunk)
        total = stats if total is None else total + stats
    if total is None:
        raise ValueError("the data source gave no chunks")
    return total


def expectation(
    features: Iterable[Tensor], params: GaussianMixtureParameters, kind: str
) -> SufficientStatistics:
    """E-step over chunks given as features (see ``second_order_features``): summed stats.

    Raises:
        ValueError: if no chunk is given.
    """
    dim = params.means.shape[-1]

    def of(chunk: Tensor) -> SufficientStatistics:
        resp, log_norm = _responsibilities(joint_log_probs(chunk, params, kind))
        return chunk_statistics(chunk, resp, log_norm, kind, dim)

    return _summed(features, of)


def centered_expectation(
    chunks: Iterable[Tensor], params: GaussianMixtureParameters, kind: str
) -> SufficientStatistics:
    """E-step over data chunks (n, d) in the centered scheme: summed stats about the means.

    Raises:
        ValueError: if no chunk is given.
    """

    def of(x: Tensor) -> SufficientStatistics:
        log_joint, diff = centered_joint_log_probs(x, params, kind)
        resp, log_norm = _responsibilities(log_joint)
        return centered_statistics(diff, resp, log_norm, kind, params.means)

    return _summed(chunks, of)


def feature_chunks(chunks: Iterable[Tensor], kind: str) -> Iterator[Tensor]:
    """The second-order features of every data chunk, computed as they are needed."""
    for x in chunks:
        yield second_order_features(x, kind)


@dataclass
class EMRun:
    """Result of ``run_em``: the last parameters and the trace of the lower bound.

    ``lower_bounds[t]`` is the mean log-likelihood at the parameters before M-step t+1,
    as scikit-learn's ``lower_bounds_``.
    """

    params: GaussianMixtureParameters
    lower_bounds: list[float] = field(default_factory=list)
    converged: bool = False
    n_iter: int = 0

    @property
    def lower_bound(self) -> float:
        return self.lower_bounds[-1] if self.lower_bounds else -math.inf


def run_em(
    chunks: Callable[[], Iterable[Tensor]],
    params: GaussianMixtureParameters,
    kind: str,
    *,
    max_iter: int,
    tol: float,
    reg_covar: float,
    constant_variance: float = 1.0,
    lower_bound: float = -math.inf,
    progress: bool = False,
    description: str = "EM",
    cache_features: bool = False,
    centered: bool = False,
) -> EMRun:
    """Full-batch EM from ``params`` until the lower bound changes by less than ``tol``.

    Args:
        chunks: a callable returning a fresh iterable of data chunks (n_i, d) at every call
            (one call per iteration); the chunks together are the data set.
        params: initial parameters (on the chunks' device and dtype).
        kind: the covariance family.
        max_iter: the most iterations (E-step + M-step).
        tol: convergence threshold on the change of the mean log-likelihood.
        reg_covar: added to the diagonal of every covariance in the M-step.
        constant_variance: the fixed variance of the ``constant`` family.
        lower_bound: the previous lower bound (warm start), for the first change.
        progress: show a tqdm bar with the lower bound.
        cache_features: keep the chunks' features from the first pass for the next ones
            (memory: N * m numbers, m = d(d+3)/2 for full and tied, 2d for diag).
        centered: use the centered scheme (accurate in float32; see
            ``inference.gmm_families``) instead of the feature scheme.

    Raises:
        ValueError: if a covariance becomes singular or the likelihood not finite.
    """
    run = EMRun(params)
    cached = None
    bar = tqdm(range(1, max_iter + 1), desc=description, disable=not progress, leave=False)
    for n_iter in bar:
        if centered:
            stats = centered_expectation(chunks(), run.params, kind)
        else:
            if cached is not None:
                features = cached
            else:
                features = feature_chunks(chunks(), kind)
                if cache_features:
                    features = cached = list(features)
            stats = expectation(features, run.params, kind)
        current = (stats.log_likelihood / stats.count).item()
        if not math.isfinite(current):
            raise ValueError(ILL_DEFINED)
        run.params = m_step(stats, kind, reg_covar, constant_variance)
        run.lower_bounds.append(current)
        run.n_iter = n_iter
        bar.set_postfix(lower_bound=f"{current:.5g}")
        if abs(current - lower_bound) < tol:
            run.converged = True
            break
        lower_bound = current
    bar.close()
    return run


def stepwise_statistics(
    running: SufficientStatistics | None, batch: SufficientStatistics, step_size: float
) -> SufficientStatistics:
    """Stepwise-EM update of running per-point statistics with a minibatch's statistics.

    Both are normalized per point, so a step size ``eta`` in (0, 1] weighs the new batch
    against everything seen before; ``running=None`` starts from the batch.
    """
    batch = batch.scaled(1.0 / batch.count.item())
    if running is None:
        return batch
    return running.scaled(1.0 - step_size) + batch.scaled(step_size)



# ----------------------------------------------------------------------------------------
# Mixtures of experts / mixtures of models (pyro_cwm.models.MixtureOfExperts)
# ----------------------------------------------------------------------------------------


@dataclass
class ExpertsEMRun:
    """The result of [`fit_experts_em`][inference.fit_experts_em] for its best start.

    ``lower_bounds`` and ``log_likelihoods`` are per point and per iteration (the bound at
    the responsibilities of that iteration, and the mean predictive log-density of the
    training data); ``best_init`` is the index of the kept start.
    """

    lower_bounds: list[float] = field(default_factory=list)
    log_likelihoods: list[float] = field(default_factory=list)
    n_iter: int = 0
    converged: bool = False
    best_init: int = 0


def _experts_em_once(model, X: Tensor, Y: Tensor, *, bar_description: str) -> ExpertsEMRun:
    """One EM run of a mixture of experts from a random start (torch's global RNG)."""
    N = X.shape[0]
    run = ExpertsEMRun()
    model.initialize(X, Y)
    # Iteration 0: responsibilities from the start's point estimates, one sweep.
    model.update(X, Y, torch.softmax(model.log_joint(X, Y), dim=-1))
    hard = model.mode == "hard"
    previous = -math.inf
    best_bound, best_state, last_state = -math.inf, None, None
    bar = tqdm(
        range(1, model.max_iter + 1), desc=bar_description, disable=not model.progress, leave=False
    )
    for n_iter in bar:
        bound, resp = model.lower_bound_terms(X, Y)
        bound = float(bound) / N
        if not math.isfinite(bound):
            if last_state is not None:
                model.load_state_dict(last_state)
            bar.close()
            raise ValueError(
                f"the EM lower bound became {bound} at iteration {n_iter}; the last finite "
                "parameters are kept (try float64 data or a larger prior_cov)"
            )
        log_lik = float(model.predict_distribution(X).log_prob(Y).mean())
        run.lower_bounds.append(bound)
        run.log_likelihoods.append(log_lik)
        run.n_iter = n_iter
        bar.set_postfix(lower_bound=f"{bound:.5g}")
        if hard:
            if bound > best_bound:
                best_bound, best_state = bound, copy.deepcopy(model.state_dict())
        elif abs(bound - previous) < model.tol:
            run.converged = True
            break
        previous = bound
        last_state = copy.deepcopy(model.state_dict())
        if hard:
            picks = torch.multinomial(resp, 1).squeeze(-1)
            weights = torch.nn.functional.one_hot(picks, model.num_experts).to(resp.dtype)
        else:
            weights = resp
        model.update(X, Y, weights)
    bar.close()
    if hard and best_state is not None:
        model.load_state_dict(best_state)
    return run


def fit_experts_em(model, X, Y) -> ExpertsEMRun:
    """Fit a [`MixtureOfExperts`][pyro_cwm.models.MixtureOfExperts] by variational EM, in place.

    Every iteration: responsibilities ``r_nk`` proportional to ``exp(E[log pi_nk] + E[log
    p(y_n | x_n, k)])`` (their lower bound is recorded), then the experts' posterior from
    the ``r``-weighted data, the gate, and the hyperparameters. In ``"soft"`` mode each
    step maximizes the bound given the others, so the recorded bound never decreases and
    the run stops when it changes by less than ``model.tol`` per point. In ``"hard"`` mode
    (stochastic EM) each point is given to one expert drawn from ``r`` and the state with
    the best bound is kept. ``model.n_init`` random starts, the best final bound wins;
    randomness comes from ``model.seed`` (the caller's RNG state is left untouched).

    The model is moved to the device and dtype of ``X`` (float32 or float64 follow the
    data); sets ``model.history_``, ``n_iter_``, ``converged_``, ``lower_bound_``.

    Raises:
        TypeError, ValueError: for bad data (see ``pyro_cwm.models.mixture_of_experts.
            check_regression_data``), or more experts than points.
        ValueError: if the bound becomes NaN or infinite (the last finite parameters are
            kept).
    """
    X, Y = model.check_data(X, Y)
    if model.num_experts > X.shape[0]:
        raise ValueError(
            f"num_experts ({model.num_experts}) must not exceed the number of points "
            f"({X.shape[0]})"
        )
    model.to(device=X.device, dtype=X.dtype)
    devices = [X.device] if X.device.type == "cuda" else []
    best_run, best_state, best_final = None, None, -math.inf
    with torch.random.fork_rng(devices=devices, enabled=model.seed is not None), torch.no_grad():
        if model.seed is not None:
            torch.manual_seed(model.seed)
        for start in range(model.n_init):
            description = f"EM experts {start + 1}/{model.n_init}"
            run = _experts_em_once(model, X, Y, bar_description=description)
            run.best_init = start
            final = max(run.lower_bounds) if model.mode == "hard" else run.lower_bounds[-1]
            if best_run is None or final > best_final:
                best_run, best_final = run, final
                best_state = copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    model.history_ = {
        "lower_bound": list(best_run.lower_bounds),
        "log_likelihood": list(best_run.log_likelihoods),
    }
    model.n_iter_ = best_run.n_iter
    model.converged_ = best_run.converged
    model.lower_bound_ = best_final
    return best_run
