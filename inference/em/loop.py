"""The EM loop of a Gaussian mixture, once for every covariance family.

- ``run_em``: full-batch EM (exact), over chunks from a re-iterable source.
- ``stepwise_statistics``: stepwise (online) EM, Cappé & Moulines (2009): running
  statistics ``s <- (1 - eta_t) s + eta_t s(batch)`` after each minibatch, then an M-step;
  [`GaussianMixtureEM.partial_fit`][inference.GaussianMixtureEM.partial_fit] uses it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor

from inference.em.distributed import all_reduce_sum
from inference.em.estep import EStep, origin_is_accurate, origin_log_joint, responsibilities_
from inference.em.families import (
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
from inference.progress import Progress


def weighted_log_probs(
    x: Tensor, params: GaussianMixtureParameters, kind: str, centered: bool = False
) -> Tensor:
    """``log pi_k + log N(x_n; mu_k, Sigma_k)`` for a chunk ``x`` (n, d): (n, K)."""
    if centered:
        pieces = _centered_pieces(x, params.means.shape[0])
        return torch.cat([centered_joint_log_probs(p, params, kind)[0].T for p in pieces])
    return origin_log_joint(x, params, kind).T


# The centered scheme's differences (K, rows, d) take about this many numbers: cache-sized
# on a CPU, a few hundred MB on a GPU (chunks are sized for the faster origin scheme, whose
# buffers hold no K x d factor).
CENTERED_NUMBERS = {"cpu": 2**19, "cuda": 2**26}


def _centered_pieces(x: Tensor, num_components: int) -> tuple[Tensor, ...]:
    """``x`` (n, d) in row pieces whose differences to the K means fit the budget of its
    device (``CENTERED_NUMBERS``)."""
    budget = CENTERED_NUMBERS.get(x.device.type, CENTERED_NUMBERS["cuda"])
    return torch.split(x, max(64, budget // (num_components * (x.shape[1] + 1))))


def _responsibilities(log_joint: Tensor) -> tuple[Tensor, Tensor]:
    """Responsibilities (K, n) and log-normalizers (n,) from joint log-densities (K, n).

    One exp pass serves both (``log_joint`` is overwritten).
    """
    top, total = log_joint.new_empty(2, 1, log_joint.shape[-1]).unbind(0)
    return log_joint, responsibilities_(log_joint, top, total)


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

    k = params.means.shape[0]
    return _summed((piece for x in chunks for piece in _centered_pieces(x, k)), of)


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
    centered_steps: int = 0  # E-steps that took the centered scheme

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
    centered: bool | None = False,
) -> EMRun:
    """Full-batch EM from ``params`` until the lower bound changes by less than ``tol``.

    Args:
        chunks: a callable returning a fresh iterable of data chunks (n_i, d) at every call
            (one call per iteration); the chunks together are the data set or, under a
            `torch.distributed` process group, this process's shard of it (the statistics
            are summed over the processes before every M-step, so every process takes the
            same steps and stops at the same iteration).
        params: initial parameters (on the chunks' device and dtype).
        kind: the covariance family.
        max_iter: the most iterations (E-step + M-step).
        tol: convergence threshold on the change of the mean log-likelihood.
        reg_covar: added to the diagonal of every covariance in the M-step.
        constant_variance: the fixed variance of the ``constant`` family.
        lower_bound: the previous lower bound (warm start), for the first change.
        progress: show progress: a bar with the lower bound when interactive, else a
            summary line.
        centered: True: the centered scheme (``centered_expectation``); False: moments
            about the origin (``inference.em.estep.EStep``, the fast one); None: at every
            iteration the fast one where ``origin_is_accurate`` for the parameters (in
            float64 always, in float32 unless the clusters lie far from the data's mean
            relative to their widths), else the centered one.

    Raises:
        ValueError: if a covariance becomes singular or the likelihood not finite.
    """
    run = EMRun(params)
    e_step = EStep(kind)
    bar = Progress(range(1, max_iter + 1), description, enabled=progress, leave=False)
    for n_iter in bar:
        # The same parameters everywhere, so every process picks the same scheme.
        if centered or (centered is None and not origin_is_accurate(run.params, kind)):
            stats = centered_expectation(chunks(), run.params, kind)
            run.centered_steps += 1
        else:
            stats = e_step(chunks(), run.params)
        # Every process's statistics: the same M-step and convergence test everywhere.
        stats = all_reduce_sum(stats)
        current = (stats.log_likelihood / stats.count).item()
        if not math.isfinite(current):
            raise ValueError(ILL_DEFINED)
        # float32 E-steps sum in float64: the M-step too, then back to the data's dtype.
        params = m_step(stats, kind, reg_covar, constant_variance)
        run.params = params.to(dtype=run.params.means.dtype)
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
