r"""The E-step of full-batch EM at the speed of the matrix products it is made of.

``EStep`` runs one E-step over data chunks and returns the
summed statistics (``inference.em.families.SufficientStatistics``). Per chunk of ``c``
rows, with moments about the origin of the (centered) data:

1. features ``F = [x, q(x), 1]`` (c, m) into a reused buffer (``second_order_features``);
2. the joint log-densities ``W @ F^T`` (K, c): one GEMM, the normalizers in ``W``'s last
   column;
3. responsibilities in place (max, exp, sum, divide: no temporary of size (K, c));
4. statistics ``R @ F`` (K, m) added into an accumulator by ``addmm_``.

The tied family, whose precision L is shared, needs no second-order features: its
log-densities are ``x'L mu_k + const_k - x'Lx / 2``, and the last term, the same for every
component, changes no responsibility; its sum over the points is ``tr(L S)`` with the
scatter ``S = sum_n x_n x_n^T``, which depends on the data only (summed in the first
E-step and kept). So one (K, d) x (d, c) GEMM, then statistics ``R @ x`` and ``R 1``: the
linear discriminant's cost.

The buffers are allocated once, at the caller's chunk size (the estimator fits them to the
CPU's L2 cache), and reused by every chunk and iteration: a fresh large temporary costs page
faults worth the arithmetic.

Flops per point and iteration, d dimensions, K components (a multiply-add is two):
``4 K m`` for the two GEMMs with ``m = 2d + 1`` (diag), ``d + 2`` (spherical, constant),
``d + d(d+1)/2 + 1`` (full), plus ``d(d+1)/2`` products to build full's features (``d``
squares for diag and spherical); tied ``4 K d`` (the scatter's ``2 d^2`` once per fit).
See ``flops_per_point``.

Accuracy. The expanded square ``x'Lx - 2 x'L mu + mu'L mu`` loses the digits of its terms'
size: a log-density carries an absolute rounding error of about
``eps (|x - mu|_L^2 + |mu|_L^2)`` (``|v|_L^2 = v' L v``). The first part is a relative error
of the log-density itself; the second, ``eps * kappa`` with ``kappa = max_k |mu_k|_L^2`` (in
the centered data's coordinates), is what the moments about the origin cost.
``origin_is_accurate`` holds when ``eps * (kappa + d)`` stays below ``ORIGIN_TOLERANCE``
(always in float64 for any sane data; in float32 unless the clusters lie many of their
own widths from the data's mean). Otherwise the caller runs the centered scheme
(``inference.em.loop.centered_expectation``), which whitens every ``x_n - mu_k``.
In float32 the statistics are summed in float64 across chunks (the returned statistics
are float64), so that N does not add to the rounding.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from inference.em.families import (
    GaussianMixtureParameters,
    SufficientStatistics,
    _pack_upper,
    feature_weights,
    feature_width,
    joint_log_probs,
    second_order_features,
)

# eps * (kappa + d) below this: the moments about the origin lose about 1e-5 nats
# per log-density (see the module documentation above).
ORIGIN_TOLERANCE = 2.0**-13

# exp() of a number whose result is subnormal or zero is 10 to 30 times slower than
# elsewhere (on x86 CPUs); log-responsibilities below log(tiny) + margin are raised to it.
# A responsibility of e^-57 (float32) or e^-678 (float64) instead of a smaller one changes
# no statistic by more than that amount times the data's scale.
EXP_FLOOR_MARGIN = 30.0


def exp_floor(dtype: torch.dtype) -> float:
    """The smallest log-responsibility ``responsibilities_`` exponentiates."""
    return math.log(torch.finfo(dtype).tiny) + EXP_FLOOR_MARGIN


def responsibilities_(log_joint: Tensor, top: Tensor, total: Tensor) -> Tensor:
    """Turn joint log-densities (K, c) into responsibilities, in place; log-normalizers.

    ``top`` and ``total`` are (1, c) buffers; the returned log-normalizers (c,) live in
    ``total``.
    """
    torch.amax(log_joint, 0, keepdim=True, out=top)  # amax: max also computes indices
    log_joint.sub_(top).clamp_min_(exp_floor(log_joint.dtype)).exp_()
    torch.sum(log_joint, 0, keepdim=True, out=total)
    log_joint.div_(total)
    return total.log_().add_(top).squeeze(0)


def origin_kappa(params: GaussianMixtureParameters, kind: str) -> float:
    """``max_k mu_k' L_k mu_k``: the size, in nats, of the expanded square's terms."""
    means, factor = params.means, params.precisions_cholesky
    if kind in ("full", "tied"):
        whitened = (means.unsqueeze(-2) @ factor).squeeze(-2)  # mu_k' P_k (K, d)
        return whitened.square().sum(-1).max().item()
    precision = factor.square()
    if kind != "diag":
        precision = precision.unsqueeze(-1)
    return (means.square() * precision).sum(-1).max().item()


def origin_is_accurate(params: GaussianMixtureParameters, kind: str) -> bool:
    """Whether the moments about the origin are accurate for these E-step parameters."""
    eps = torch.finfo(params.means.dtype).eps
    return eps * (origin_kappa(params, kind) + params.means.shape[-1]) <= ORIGIN_TOLERANCE


def flops_per_point(kind: str, dim: int, num_components: int) -> int:
    """The dominant flops of one E-step (and its statistics) per data point.

    The two GEMMs (log-densities and statistics) and the features' products (tied's
    scatter is summed once per fit); the O(K) elementwise work per point (exp, max, sum,
    divide) is left out.
    """
    d, k = dim, num_components
    if kind == "tied":
        return 4 * k * d
    m = feature_width(d, kind)
    build = d * (d + 1) // 2 if kind == "full" else d
    return 4 * k * m + build


def centered_flops_per_point(kind: str, dim: int, num_components: int) -> int:
    """The dominant flops of one centered E-step (``centered_expectation``) per point.

    Per component: the difference (d), its whitening (``2 d^2`` full and tied, ``d``
    diag) and squared norm (``2 d``); the statistics' weighting (d), first moment (d) and
    second moment (``2 d^2`` full and tied, ``2 d`` otherwise).
    """
    d, k = dim, num_components
    if kind in ("full", "tied"):
        return k * (4 * d * d + 5 * d)
    return k * (8 * d if kind == "diag" else 7 * d)


class EStep:
    """E-steps about the origin over data chunks, with buffers reused between calls.

    One instance serves one data set (every iteration of a fit): a call takes an iterable
    of chunks (c_i, d) of the centered data, the same data at every call, and the E-step
    parameters, and returns the summed statistics, in float64 for float32 data (see
    [the module documentation][inference.em.estep]). The tied family's scatter
    ``sum_n x_n x_n^T`` depends on the data only: it is summed at the first call and
    reused.

    Args:
        kind: the covariance family.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._buffers: dict[str, Tensor] = {}
        self._scatter: Tensor | None = None  # tied: sum_n x_n x_n^T, the same every call

    def _buffer(self, name: str, numel: int, like: Tensor, dtype=None) -> Tensor:
        """A flat buffer of at least ``numel`` numbers, kept for the next calls."""
        dtype = dtype or like.dtype
        buffer = self._buffers.get(name)
        if (
            buffer is None
            or buffer.numel() < numel
            or buffer.dtype != dtype
            or buffer.device != like.device
        ):
            buffer = self._buffers[name] = torch.empty(numel, dtype=dtype, device=like.device)
        return buffer[:numel]

    def __call__(
        self, chunks: Iterable[Tensor], params: GaussianMixtureParameters
    ) -> SufficientStatistics:
        """Summed statistics of the chunks (moments about the origin).

        Raises:
            ValueError: if no chunk is given.
        """
        kind = self.kind
        k, d = params.means.shape
        like = params.means
        wide = torch.float64 if like.dtype == torch.float32 else like.dtype
        tied = kind == "tied"
        if tied:
            weights, const = _tied_weights(params)
            width = d + 1
            scatter = self._scatter  # data only: summed on the first call
        else:
            weights, width = feature_weights(params, kind), feature_width(d, kind)
        moments = self._buffer("moments", k * width, like, wide).view(k, width).zero_()
        if tied and scatter is None:
            scatter = self._buffer("scatter", d * d, like, wide).view(d, d).zero_()
        log_likelihood = like.new_zeros((), dtype=wide)
        count = 0
        for x in chunks:
            c = x.shape[0]
            count += c
            log_joint = self._buffer("log_joint", k * c, like).view(k, c)
            top = self._buffer("top", c, like).view(1, c)
            total = self._buffer("total", c, like).view(1, c)
            if tied:
                # Without -x'Lx / 2, a constant per point: the responsibilities are the
                # same and the log-likelihood gets its sum back from the scatter below.
                torch.addmm(const, weights, x.T, out=log_joint)
                log_likelihood += responsibilities_(log_joint, top, total).sum(dtype=wide)
                first = moments[:, :d]
                _add_product(first, log_joint, x, self._buffer("product", k * d, like))
                moments[:, d] += log_joint.sum(-1)
                if self._scatter is None:
                    _add_product(scatter, x.T, x, self._buffer("scatter_part", d * d, like))
                continue
            features = self._buffer("features", c * width, like).view(c, width)
            second_order_features(x, kind, out=features)
            torch.mm(weights, features.T, out=log_joint)
            log_likelihood += responsibilities_(log_joint, top, total).sum(dtype=wide)
            _add_product(moments, log_joint, features, self._buffer("product", k * width, like))
        if count == 0:
            raise ValueError("the data source gave no chunks")
        if tied:
            self._scatter = scatter
            factor = params.precisions_cholesky.to(wide)
            log_likelihood -= 0.5 * (factor.mT @ scatter @ factor).trace()  # sum_n x_n'Lx_n
            second = _pack_upper(scatter)
        else:
            second = moments[:, d:-1].clone()
        return SufficientStatistics(
            like.new_tensor(float(count), dtype=wide),
            log_likelihood,
            moments[:, -1].clone(),
            moments[:, :d].clone(),
            second,
        )


def origin_log_joint(x: Tensor, params: GaussianMixtureParameters, kind: str) -> Tensor:
    """``log pi_k + log N(x_n; mu_k, Sigma_k)`` (K, n) by the moments about the origin."""
    if kind != "tied":
        return joint_log_probs(second_order_features(x, kind), params, kind)
    weights, const = _tied_weights(params)
    whitened = x @ params.precisions_cholesky
    log_joint = torch.addmm(const, weights, x.T)
    return log_joint.sub_(0.5 * whitened.square().sum(-1))


def _add_product(accumulator: Tensor, a: Tensor, b: Tensor, buffer: Tensor) -> None:
    """``accumulator += a @ b``; through ``buffer`` when the accumulator is wider."""
    if accumulator.dtype == a.dtype:
        accumulator.addmm_(a, b)
    else:
        accumulator.add_(torch.mm(a, b, out=buffer.view(accumulator.shape)))


def _tied_weights(params: GaussianMixtureParameters) -> tuple[Tensor, Tensor]:
    """Weights ``L mu_k`` (K, d) and constants (K, 1) of the tied family's log-densities:
    ``log pi_k + log N(x; mu_k, Sigma) = x'L mu_k + const_k - x'Lx / 2``, the linear and
    constant columns of ``feature_weights`` (its shared quadratic part is applied once per
    point instead, as ``|xP|^2``)."""
    weights = feature_weights(params, "tied")
    return weights[:, : params.means.shape[-1]], weights[:, -1:]


__all__ = [
    "EStep",
    "ORIGIN_TOLERANCE",
    "centered_flops_per_point",
    "exp_floor",
    "flops_per_point",
    "origin_log_joint",
    "origin_is_accurate",
    "origin_kappa",
    "responsibilities_",
]
