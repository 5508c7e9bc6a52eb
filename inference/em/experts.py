"""Variational EM of a mixture of experts or of models.

[`fit_experts_em`][inference.fit_experts_em] fits a
[`MixtureOfExperts`][pyro_cwm.models.MixtureOfExperts] (or a
[`MixtureOfModels`][pyro_cwm.models.MixtureOfModels]) in place: responsibilities, the
experts' Gaussian posteriors, the gate, the hyperparameters. The model holds the steps
(``initialize``, ``update``, ``lower_bound_terms``); the loop, the restarts and the
convergence test live here, so that ``pyro_cwm`` never imports ``inference``.

Under a `torch.distributed` process group the loop is data-parallel: each process passes
its shard of the points, and the experts' and gates' sums over the points (statistics,
counts, gradients of the gate's data term) go through
[`all_reduce_sum`][inference.em.distributed.all_reduce_sum], installed for the fit as
``pyro_cwm.models.point_sums``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from inference.em.distributed import (
    all_reduce_sum,
    check_shards,
    global_rows,
    is_distributed,
    rank_and_size,
    shard_offset,
    shared_seed,
)
from inference.progress import Progress
from pyro_cwm.models.point_sums import PointSums, point_sums, using_point_sums


class ProcessPointSums(PointSums):
    """Sums over the points of every process of the `torch.distributed` group.

    Args:
        num_rows: this process's number of points (the shards in rank order are the data).
    """

    distributed = True

    def __init__(self, num_rows: int) -> None:
        self.offset, self.num_points = shard_offset(num_rows)

    def total(self, values):
        return all_reduce_sum(values)

    def count(self, num_rows: int) -> int:
        return self.num_points

    def rows(self, values: Tensor, index: Tensor) -> Tensor:
        return global_rows(values, index, self.offset)

    def total_gradients(self, parameters) -> None:
        grads = [p for p in parameters if p.grad is not None]
        for p, total in zip(grads, all_reduce_sum([p.grad for p in grads])):
            p.grad = total


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
    sums = point_sums()
    N = sums.count(X.shape[0])
    run = ExpertsEMRun()
    model.initialize(X, Y)
    # Iteration 0: responsibilities from the start's point estimates, one sweep.
    model.update(X, Y, torch.softmax(model.log_joint(X, Y), dim=-1))
    hard = model.mode == "hard"
    previous = -math.inf
    best_bound, best_state, last_state = -math.inf, None, None
    bar = Progress(
        range(1, model.max_iter + 1),
        bar_description,
        enabled=model.progress and rank_and_size()[0] == 0,
        leave=False,
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
        log_lik = float(sums.total(model.predict_distribution(X).log_prob(Y).sum())) / N
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
            weights = _draw_assignments(resp, sums)
        else:
            weights = resp
        model.update(X, Y, weights)
    bar.close()
    if hard and best_state is not None:
        model.load_state_dict(best_state)
    return run


def _draw_assignments(resp: Tensor, sums: PointSums) -> Tensor:
    """One expert per point drawn from ``resp`` (n, K), as one-hot rows (n, K).

    Inverse-CDF draws from one uniform per point of the whole data set (torch's global
    RNG, in the same state on every process): a process keeps the uniforms of its own
    rows, so the processes together draw what one process draws for all the points.
    """
    n, k = resp.shape
    uniforms = torch.rand(sums.count(n), dtype=resp.dtype, device=resp.device)
    uniforms = uniforms[sums.offset : sums.offset + n]
    picks = (resp.cumsum(-1) < uniforms.unsqueeze(-1)).sum(-1).clamp_max(k - 1)
    return torch.nn.functional.one_hot(picks, k).to(resp.dtype)


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

    Under ``torchrun`` (a `torch.distributed` process group) every process passes its shard
    of the points and every process ends with the fit of all of them, the one a single
    process gets on the concatenated shards (both modes, every gate and expert family;
    a per-sample gate keeps the posteriors of this process's points); ``seed=None`` takes
    rank 0's seed. Mismatched shards are a ValueError on every process.

    Raises:
        TypeError, ValueError: for bad data (see ``pyro_cwm.models.mixture_of_experts.
            check_regression_data``), or more experts than points.
        ValueError: if the bound becomes NaN or infinite (the last finite parameters are
            kept).
    """
    sharded = is_distributed()
    X, Y, error = _checked(model, X, Y, sharded)
    if sharded:
        check_shards(*((0, torch.float64) if X is None else (X.shape[1], X.dtype)), error)
    sums = ProcessPointSums(X.shape[0]) if sharded else PointSums()
    if model.num_experts > sums.count(X.shape[0]):
        raise ValueError(
            f"num_experts ({model.num_experts}) must not exceed the number of points "
            f"({sums.count(X.shape[0])})"
        )
    model.to(device=X.device, dtype=X.dtype)
    devices = [X.device] if X.device.type == "cuda" else []
    seed = model.seed
    if sharded and seed is None:  # every process starts where rank 0 does
        seed = shared_seed(int(torch.randint(2**62, (1,))))
    best_run, best_state, best_final = None, None, -math.inf
    with (
        torch.random.fork_rng(devices=devices, enabled=seed is not None),
        torch.no_grad(),
        using_point_sums(sums),
    ):
        if seed is not None:
            torch.manual_seed(seed)
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


def _checked(model, X, Y, sharded: bool):
    """``model.check_data(X, Y)`` and its error (raised at once in one process)."""
    try:
        return (*model.check_data(X, Y), None)
    except (TypeError, ValueError) as error:
        if not sharded:
            raise
        return None, None, error
