r"""The Gaussian mixture distribution, with the covariance families of scikit-learn.

``p(x) = sum_k pi_k N(x; mu_k, Sigma_k)``, with ``Sigma_k`` by family:

| family        | covariance                      | ``scale`` argument                  |
| ------------- | ------------------------------- | ----------------------------------- |
| ``full``      | ``Sigma_k = L_k L_k^T``         | ``(..., K, d, d)`` lower Cholesky   |
| ``tied``      | ``Sigma_k = L L^T`` for every k | ``(..., d, d)`` lower Cholesky      |
| ``diag``      | ``diag(s_k^2)``                 | ``(..., K, d)`` standard deviations |
| ``spherical`` | ``s_k^2 I``                     | ``(..., K)`` standard deviations    |
| ``constant``  | ``s^2 I``, one fixed value      | ``(...)`` standard deviation        |

The densities go through the precision factor ``P = L^{-T}`` (``Sigma^{-1} = P P^T``):

```text
log N(x; mu, Sigma) = -d/2 log(2 pi) + log|det P| - 1/2 ||(x - mu)^T P||^2,
```

computed on differences so that it stays accurate in float32 far from the origin.
"""

from __future__ import annotations

import math

import torch
from pyro.distributions import Categorical, TorchDistribution, constraints
from torch import Size, Tensor

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical", "constant")

# Number of trailing dims of ``scale`` that are not batch dims, per family.
_SCALE_EVENT_DIMS = {"full": 3, "tied": 2, "diag": 2, "spherical": 1, "constant": 0}


def check_covariance_type(covariance_type: str) -> str:
    """Return ``covariance_type`` or raise a ValueError that lists the families."""
    if covariance_type not in COVARIANCE_TYPES:
        raise ValueError(
            f"covariance_type must be one of {COVARIANCE_TYPES}, got {covariance_type!r}"
        )
    return covariance_type


def precision_factor(scale: Tensor, covariance_type: str) -> Tensor:
    """The factor P with ``P P^T = Sigma^{-1}``: ``L^{-T}`` for full/tied, ``1/s`` otherwise.

    ``scale`` has the family's shape (see
    [the module documentation][pyro_cwm.distributions.gaussian_mixture]); the result has the
    same.
    """
    if covariance_type in ("full", "tied"):
        eye = torch.eye(scale.shape[-1], dtype=scale.dtype, device=scale.device)
        return torch.linalg.solve_triangular(scale, eye, upper=False).mT
    return scale.reciprocal()


def log_det_precision_factor(factor: Tensor, covariance_type: str, dim: int) -> Tensor:
    """``log|det P|`` per component (..., K) (full, diag, spherical) or shared (tied, constant)."""
    if covariance_type in ("full", "tied"):
        return factor.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    if covariance_type == "diag":
        return factor.log().sum(-1)
    return dim * factor.log()


def gaussian_component_log_probs(
    value: Tensor, loc: Tensor, factor: Tensor, covariance_type: str
) -> Tensor:
    """``log N(value; loc_k, Sigma_k)`` for every component: shape (..., K).

    Args:
        value: points, shape (..., d), broadcastable against the batch shape.
        loc: component means (*batch, K, d).
        factor: precision factor from ``precision_factor``, of the family's shape.
        covariance_type: one of [`COVARIANCE_TYPES`][pyro_cwm.distributions.COVARIANCE_TYPES].
    """
    d = loc.shape[-1]
    diff = value.unsqueeze(-2) - loc  # (..., K, d)
    if covariance_type == "full":
        white = torch.einsum("...kd,...kde->...ke", diff, factor)
        maha = white.square().sum(-1)
    elif covariance_type == "tied":
        maha = torch.einsum("...kd,...de->...ke", diff, factor).square().sum(-1)
    elif covariance_type == "diag":
        maha = (diff * factor).square().sum(-1)
    elif covariance_type == "spherical":
        maha = diff.square().sum(-1) * factor.square()
    else:
        maha = diff.square().sum(-1) * factor.square().unsqueeze(-1)
    log_det = log_det_precision_factor(factor, covariance_type, d)
    if covariance_type in ("tied", "constant"):
        log_det = log_det.unsqueeze(-1)
    return log_det - 0.5 * (d * math.log(2 * math.pi) + maha)


class GaussianMixture(TorchDistribution):
    r"""A finite mixture of Gaussians with one of five covariance families.

    Args:
        loc: component means, shape (*batch, K, d).
        scale: the covariance parameter of the family (see
            [the module documentation][pyro_cwm.distributions.gaussian_mixture]): a lower
            Cholesky factor (full ``(*batch, K, d, d)``, tied ``(*batch, d, d)``) or
            standard deviations (diag ``(*batch, K, d)``, spherical ``(*batch, K)``,
            constant ``(*batch,)`` or a scalar).
        covariance_type: ``"full"``, ``"tied"``, ``"diag"``, ``"spherical"`` or ``"constant"``.
        probs: mixture weights (*batch, K) on the simplex; or
        logits: unnormalized log-weights (*batch, K). Exactly one of the two.
        validate_args: as in ``torch.distributions``.

    Raises:
        ValueError: for an unknown ``covariance_type``, both or neither of ``probs`` and
            ``logits``, shapes that disagree on K or d, or (with validation) a scale that is
            not positive / not a lower Cholesky factor.

    The event shape is (d,); the batch shape is the broadcast of the arguments' batch dims.
    """

    support = constraints.real_vector
    has_rsample = False

    def __init__(
        self,
        loc: Tensor,
        scale: Tensor,
        covariance_type: str = "full",
        *,
        probs: Tensor | None = None,
        logits: Tensor | None = None,
        validate_args: bool | None = None,
    ) -> None:
        self.covariance_type = check_covariance_type(covariance_type)
        if (probs is None) == (logits is None):
            raise ValueError("give exactly one of probs and logits")
        if loc.dim() < 2:
            raise ValueError(f"loc must have shape (..., K, d), got {tuple(loc.shape)}")
        scale = torch.as_tensor(scale, dtype=loc.dtype, device=loc.device)
        num_components, dim = loc.shape[-2:]
        expected = {
            "full": (num_components, dim, dim),
            "tied": (dim, dim),
            "diag": (num_components, dim),
            "spherical": (num_components,),
            "constant": (),
        }[covariance_type]
        event_dims = _SCALE_EVENT_DIMS[covariance_type]
        if scale.dim() < event_dims or tuple(scale.shape[scale.dim() - event_dims :]) != expected:
            raise ValueError(
                f"scale of a {covariance_type!r} mixture with K={num_components}, d={dim} "
                f"must have shape (..., {', '.join(map(str, expected))}), "
                f"got {tuple(scale.shape)}"
            )
        weights = probs if probs is not None else logits
        if weights.dim() < 1 or weights.shape[-1] != num_components:
            name = "probs" if probs is not None else "logits"
            raise ValueError(
                f"{name} must have shape (..., {num_components}), got {tuple(weights.shape)}"
            )
        batch_shape = torch.broadcast_shapes(
            loc.shape[:-2], scale.shape[: scale.dim() - event_dims], weights.shape[:-1]
        )
        self.loc = loc.expand(batch_shape + loc.shape[-2:])
        self.scale = scale.expand(batch_shape + Size(expected))
        self._categorical = Categorical(
            probs=None if probs is None else probs.expand(batch_shape + (-1,)),
            logits=None if logits is None else logits.expand(batch_shape + (-1,)),
            validate_args=validate_args,
        )
        super().__init__(batch_shape, Size((dim,)), validate_args=validate_args)

    @property
    def arg_constraints(self) -> dict[str, constraints.Constraint]:
        if self.covariance_type in ("full", "tied"):
            return {"loc": constraints.real_vector, "scale": constraints.lower_cholesky}
        return {"loc": constraints.real_vector, "scale": constraints.positive}

    @property
    def num_components(self) -> int:
        return self.loc.shape[-2]

    @property
    def probs(self) -> Tensor:
        """Mixture weights (*batch, K)."""
        return self._categorical.probs

    @property
    def logits(self) -> Tensor:
        """Normalized log-weights (*batch, K)."""
        return self._categorical.logits

    @property
    def precision_factor(self) -> Tensor:
        """P with ``P P^T = Sigma^{-1}``, of the family's shape: ``L^{-T}`` or ``1/s``."""
        return precision_factor(self.scale, self.covariance_type)

    @property
    def component_covariances(self) -> Tensor:
        """Every component's covariance matrix, (*batch, K, d, d)."""
        d, k = self.loc.shape[-1], self.num_components
        if self.covariance_type in ("full", "tied"):
            cov = self.scale @ self.scale.mT
            return cov if self.covariance_type == "full" else cov.unsqueeze(-3).expand(
                *self.batch_shape, k, d, d
            )
        var = self.scale.square()
        if self.covariance_type == "spherical":
            var = var.unsqueeze(-1).expand(*self.batch_shape, k, d)
        elif self.covariance_type == "constant":
            var = var[..., None, None].expand(*self.batch_shape, k, d)
        return torch.diag_embed(var)

    @property
    def mean(self) -> Tensor:
        return (self.probs.unsqueeze(-1) * self.loc).sum(-2)

    @property
    def covariance_matrix(self) -> Tensor:
        """Covariance of the mixture, ``sum_k pi_k (Sigma_k + mu_k mu_k^T) - m m^T``."""
        centered = self.loc - self.mean.unsqueeze(-2)
        outer = centered.unsqueeze(-1) * centered.unsqueeze(-2)
        return (self.probs[..., None, None] * (self.component_covariances + outer)).sum(-3)

    @property
    def variance(self) -> Tensor:
        return self.covariance_matrix.diagonal(dim1=-2, dim2=-1)

    def expand(self, batch_shape, _instance=None) -> GaussianMixture:
        new = self._get_checked_instance(GaussianMixture, _instance)
        batch_shape = Size(batch_shape)
        new.covariance_type = self.covariance_type
        new.loc = self.loc.expand(batch_shape + self.loc.shape[-2:])
        event_dims = _SCALE_EVENT_DIMS[self.covariance_type]
        new.scale = self.scale.expand(
            batch_shape + self.scale.shape[self.scale.dim() - event_dims :]
        )
        new._categorical = self._categorical.expand(batch_shape)
        super(GaussianMixture, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def component_log_probs(self, value: Tensor) -> Tensor:
        """``log N(value; mu_k, Sigma_k)`` for every component k: shape (..., K)."""
        if self._validate_args:
            self._validate_sample(value)
        return gaussian_component_log_probs(
            value, self.loc, self.precision_factor, self.covariance_type
        )

    def log_prob(self, value: Tensor) -> Tensor:
        """Log-density of ``value`` (..., d): shape ``broadcast(value.shape[:-1], batch)``."""
        return torch.logsumexp(self.logits + self.component_log_probs(value), dim=-1)

    def posterior_log_probs(self, value: Tensor) -> Tensor:
        """Log-responsibilities ``log p(k | value)``, normalized over the last dim (..., K)."""
        joint = self.logits + self.component_log_probs(value)
        return joint - torch.logsumexp(joint, dim=-1, keepdim=True)

    def sample_with_components(self, sample_shape=Size()) -> tuple[Tensor, Tensor]:
        """Draw ``(x, k)``: points ``(*sample, *batch, d)``, components ``(*sample, *batch)``."""
        with torch.no_grad():
            k = self._categorical.sample(sample_shape)
            shape = k.shape
            d = self.event_shape[0]
            loc = self.loc.expand(shape + self.loc.shape[-2:])
            mu = loc.gather(-2, k[..., None, None].expand(*shape, 1, d)).squeeze(-2)
            eps = torch.randn(shape + (d,), dtype=self.loc.dtype, device=self.loc.device)
            kind = self.covariance_type
            if kind == "full":
                scale = self.scale.expand(shape + self.scale.shape[-3:])
                index = k[..., None, None, None].expand(*shape, 1, d, d)
                tril = scale.gather(-3, index).squeeze(-3)
                noise = (tril @ eps.unsqueeze(-1)).squeeze(-1)
            elif kind == "tied":
                noise = (self.scale @ eps.unsqueeze(-1)).squeeze(-1)
            elif kind == "diag":
                scale = self.scale.expand(shape + self.scale.shape[-2:])
                noise = scale.gather(-2, k[..., None, None].expand(*shape, 1, d)).squeeze(-2) * eps
            elif kind == "spherical":
                noise = self.scale.expand(shape + (self.num_components,)).gather(
                    -1, k.unsqueeze(-1)
                ) * eps
            else:
                noise = self.scale.unsqueeze(-1) * eps
            return mu + noise, k

    def sample(self, sample_shape=Size()) -> Tensor:
        """Draw points: shape (*sample_shape, *batch_shape, d)."""
        return self.sample_with_components(sample_shape)[0]
