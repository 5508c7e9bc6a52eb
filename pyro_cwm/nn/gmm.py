"""``GMM``: a trainable Gaussian mixture module, for gradient-descent fitting.

The module owns unconstrained parameters and calling it returns a
[`GaussianMixture`][pyro_cwm.distributions.GaussianMixture] (the lazy-distribution pattern of
[`CWM`][pyro_cwm.nn.CWM] and zuko), so a mixture can sit at the end of a larger network and be
fitted by Adam on the negative log-likelihood (``inference.fit_density(gmm, data)``), as
the seed did. For a stand-alone mixture EM is faster and exact:
``inference.GaussianMixtureEM``; its fit can be loaded with
[`GMM.set_parameters`][pyro_cwm.nn.GMM.set_parameters].
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributions import constraints, transform_to

from pyro_cwm.distributions.gaussian_mixture import GaussianMixture, check_covariance_type
from pyro_cwm.nn.checks import check_positive_int


class GMM(nn.Module):
    """A K-component Gaussian mixture in d dimensions with learnable parameters.

    Args:
        dim: d.
        num_components: K.
        covariance_type: ``"full"``, ``"tied"``, ``"diag"``, ``"spherical"`` or
            ``"constant"`` (every component ``constant_scale**2 * I``, not learned).
        constant_scale: the fixed standard deviation of the ``constant`` family.

    The parameters start at means N(0, I), unit scales and equal weights. Gradient descent
    on a mixture finds local optima, so start from data: a k-means start is
    ``GaussianMixtureEM(K, covariance_type=..., max_iter=0).fit(data).parameters()``,
    loaded with [`set_parameters`][pyro_cwm.nn.GMM.set_parameters].

    Raises:
        ValueError: for d or K below 1, an unknown family or a non-positive scale.
    """

    def __init__(
        self,
        dim: int,
        num_components: int,
        covariance_type: str = "full",
        constant_scale: float = 1.0,
    ) -> None:
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("num_components", num_components)
        self.covariance_type = check_covariance_type(covariance_type)
        if not constant_scale > 0:
            raise ValueError(f"constant_scale must be > 0, got {constant_scale}")
        self.dim, self.num_components = dim, num_components
        self.logits = nn.Parameter(torch.zeros(num_components))
        self.loc = nn.Parameter(torch.randn(num_components, dim))
        shape = {
            "full": (num_components, dim, dim),
            "tied": (dim, dim),
            "diag": (num_components, dim),
            "spherical": (num_components,),
        }.get(covariance_type)
        if shape is None:
            self.register_buffer("scale", torch.tensor(float(constant_scale)))
        else:  # zeros are the unconstrained identity / unit scales
            self.raw_scale = nn.Parameter(torch.zeros(shape))

    def _constraint(self):
        return (
            constraints.lower_cholesky
            if self.covariance_type in ("full", "tied")
            else constraints.positive
        )

    def _unconstrain(self, scale: Tensor) -> Tensor:
        return transform_to(self._constraint()).inv(scale)

    def component_scale(self) -> Tensor:
        """The ``scale`` argument of the distribution (Cholesky factor or sds).

        See [`GaussianMixture`][pyro_cwm.distributions.GaussianMixture].
        """
        if self.covariance_type == "constant":
            return self.scale
        return transform_to(self._constraint())(self.raw_scale)

    def forward(self, context: Tensor | None = None) -> GaussianMixture:
        """The mixture as a distribution (``context`` must be None: it is unconditional)."""
        if context is not None:
            raise ValueError("GMM is unconditional: context must be None")
        return GaussianMixture(
            self.loc, self.component_scale(), self.covariance_type, logits=self.logits
        )

    @torch.no_grad()
    def set_parameters(self, weights: Tensor, means: Tensor, covariances: Tensor) -> None:
        """Load weights (K,), means (K, d) and covariances of the family's shape.

        Covariances follow scikit-learn's shapes: (K, d, d) full, (d, d) tied, (K, d)
        diag, (K,) spherical; ignored for ``constant``. ``GaussianMixtureEM.parameters()``
        gives them.
        """
        weights, means, covariances = (
            torch.as_tensor(v, dtype=self.loc.dtype, device=self.loc.device)
            for v in (weights, means, covariances)
        )
        if means.shape != self.loc.shape or weights.shape != self.logits.shape:
            raise ValueError(
                f"weights and means must have shapes {tuple(self.logits.shape)} and "
                f"{tuple(self.loc.shape)}, got {tuple(weights.shape)} and {tuple(means.shape)}"
            )
        self.logits.copy_(weights.log())
        self.loc.copy_(means)
        if self.covariance_type == "constant":
            return
        if self.covariance_type in ("full", "tied"):
            scale = torch.linalg.cholesky(covariances)
        else:
            scale = covariances.sqrt()
        if scale.shape != self.raw_scale.shape:
            raise ValueError(
                f"covariances of a {self.covariance_type!r} GMM must have shape "
                f"{tuple(self.raw_scale.shape)}, got {tuple(covariances.shape)}"
            )
        self.raw_scale.copy_(self._unconstrain(scale))
