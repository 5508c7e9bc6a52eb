"""The CWM module: owns a CWM's parameters and returns the distribution when called."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pyro.distributions import Normal
from torch import Tensor, nn

from pyro_cwm.distributions.cwm import ClassifierWeightedMixture
from pyro_cwm.nn.checks import check_hidden_dims, check_positive_int
from pyro_cwm.nn.classifiers import SoftmaxClassifier
from pyro_cwm.nn.maps import build_maps


def reference_cells(
    num_components: int, dim: int, num_points: int = 256, steps: int = 30
) -> tuple[Tensor, Tensor]:
    """A spread start: the K cells of a k-means partition of N(0, I_d).

    k-means (k-means++ start, ``steps`` Lloyd steps) on ``num_points * K`` draws of a
    private generator (seed 0: deterministic, the global random state untouched).
    Component k gets its cell's mean and per-coordinate standard deviation, so the
    equally weighted mixture has mean 0 and covariance close to I (the law of total
    variance). Returns ``(loc, scale)``, each of shape (K, d), float32.
    """
    generator = torch.Generator().manual_seed(0)
    points = torch.randn(num_points * num_components, dim, generator=generator)
    centers = points[:1]
    for _ in range(1, num_components):
        gap = torch.cdist(points, centers).min(-1).values.square()
        pick = torch.multinomial(gap, 1, generator=generator)
        centers = torch.cat((centers, points[pick]))
    labels = None
    for _ in range(steps):
        previous, labels = labels, torch.cdist(points, centers).argmin(-1)
        if previous is not None and torch.equal(labels, previous):
            break  # converged: more steps would give the same centres
        one_hot = nn.functional.one_hot(labels, num_components).to(points.dtype)
        counts = one_hot.sum(0).clamp(min=1).unsqueeze(-1)
        centers = one_hot.T @ points / counts
    spread = (one_hot.T @ points.square() / counts - centers.square()).clamp(min=1e-2).sqrt()
    return centers, spread


class CWM(nn.Module):
    """A Classifier Weighted Mixture with reference N(0, I_d), K maps and a softmax MLP.

    Call it to get the distribution: ``cwm()`` for the unconditional CWM, ``cwm(context)``
    (context of shape (..., context_dim)) for p(x | context), whose batch shape is
    ``context.shape[:-1]``.

    Args:
        dim: dimension d of the data.
        num_components: number of components K.
        hidden_dims: hidden widths of the classifier (and of the context networks of
            conditional maps, unless ``map_options`` says otherwise).
        map: ``"location_scale"`` (diagonal), ``"affine"`` (lower-triangular scale) or
            ``"flow"`` (a conditional spline flow shared by the K maps).
        context_dim: dimension of the context; 0 for an unconditional CWM.
        map_options: keyword arguments of the maps family (the class that
            [`MAPS`][pyro_cwm.nn.MAPS] holds under ``map``).
        standardize_context: feed the networks ``(context - mean) / std``, with the mean
            and std of the first context the module is called with (buffers, saved in the
            ``state_dict``); the distribution is still conditional on the raw context.
        spread: spread the components at the start, as below; False leaves every map the
            identity, for a caller that sets the mixture itself (AutoCWM).

    Initially the classifier is constant (uniform weights) and the components are spread
    over the reference (see [`reference_cells`][pyro_cwm.nn.cwm.reference_cells]): K
    coinciding components would stay together under any gradient, and as a variational
    family they would settle on one mode.
    [`set_gaussian_mixture`][pyro_cwm.nn.CWM.set_gaussian_mixture] (used by EM pretraining
    and AutoCWM) sets another diagonal Gaussian mixture.

    Raises:
        ValueError, TypeError: for a non-positive dimension, K < 1 or an unknown map.
    """

    def __init__(
        self,
        dim: int,
        num_components: int,
        hidden_dims: Sequence[int] = (64,),
        map: str = "location_scale",
        context_dim: int = 0,
        map_options: dict[str, Any] | None = None,
        standardize_context: bool = True,
        spread: bool = True,
    ) -> None:
        super().__init__()
        self.dim = check_positive_int("dim", dim)
        self.num_components = check_positive_int("num_components", num_components)
        self.context_dim = check_positive_int("context_dim", context_dim, allow_zero=True)
        self.hidden_dims = check_hidden_dims(hidden_dims)
        self.map = map
        self.map_options = dict(map_options or {})
        options = {"hidden_dims": self.hidden_dims, **self.map_options}
        self.maps = build_maps(map, dim, num_components, context_dim, **options)
        self.classifier = SoftmaxClassifier(dim, num_components, self.hidden_dims, context_dim)
        self.register_buffer("reference_loc", torch.zeros(dim))
        self.register_buffer("reference_scale", torch.ones(dim))
        self.standardize_context = bool(standardize_context)
        self.register_buffer("context_loc", torch.zeros(self.context_dim))
        self.register_buffer("context_scale", torch.ones(self.context_dim))
        self.register_buffer("context_set", torch.tensor(False))
        self._context_set = False  # a Python copy: no device sync on every call
        if spread and num_components > 1:
            loc, scale = reference_cells(num_components, dim)
            self.set_gaussian_mixture(torch.ones(num_components), loc, scale)

    def config(self) -> dict[str, Any]:
        """The constructor arguments, to rebuild the module with ``CWM(**config)``."""
        return {
            "dim": self.dim,
            "num_components": self.num_components,
            "hidden_dims": list(self.hidden_dims),
            "map": self.map,
            "context_dim": self.context_dim,
            "map_options": self.map_options,
            "standardize_context": self.standardize_context,
        }

    def reference(self) -> torch.distributions.Distribution:
        """The reference N(0, I_d) on the module's device and dtype."""
        return Normal(self.reference_loc, self.reference_scale).to_event(1)

    def forward(self, context: Tensor | None = None) -> ClassifierWeightedMixture:
        """The distribution ``p(x)``, or ``p(x | context)`` for a context (..., context_dim)."""
        if context is not None and isinstance(context, Tensor):
            context = context.to(self.reference_loc.dtype)
            if self.standardize_context and context.shape[-1:] == (self.context_dim,):
                if not self._context_set:
                    self._set_context_scaling(context)
                context = (context - self.context_loc) / self.context_scale
        return ClassifierWeightedMixture(self.reference(), self.maps, self.classifier, context)

    @torch.no_grad()
    def _set_context_scaling(self, context: Tensor) -> None:
        # A first call with one context row centres nothing (its std is undefined); rows
        # holding NaN or inf are left to the distribution's check, which names the site.
        rows = context.detach().reshape(-1, self.context_dim)
        rows = rows[torch.isfinite(rows).all(-1)]
        if rows.shape[0] == 0:
            return
        if rows.shape[0] > 1:
            std = rows.std(dim=0)
            self.context_loc.copy_(rows.mean(dim=0))
            self.context_scale.copy_(torch.where(std > 0, std, torch.ones_like(std)))
        self.context_set.fill_(True)
        self._context_set = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._context_set = bool(self.context_set)

    def set_gaussian_mixture(self, weights: Tensor, loc: Tensor, scale: Tensor) -> None:
        """Make the CWM equal the diagonal Gaussian mixture ``sum_k w_k N(loc_k, diag scale_k^2)``.

        The classifier becomes constant (last layer zero, bias log weights) and every map
        the location-scale map ``z -> loc_k + scale_k z``, independent of any context.

        Args:
            weights: mixture weights, shape (K,), positive (normalized here).
            loc: component means, shape (K, d).
            scale: component standard deviations, shape (K, d), positive.

        Raises:
            ValueError: for wrong shapes, non-finite values, non-positive weights or scales.
        """
        param = self.reference_loc
        weights, loc, scale = (
            torch.as_tensor(t).to(device=param.device, dtype=param.dtype)
            for t in (weights, loc, scale)
        )
        if weights.shape != (self.num_components,):
            raise ValueError(
                f"weights must have shape ({self.num_components},), got {tuple(weights.shape)}"
            )
        if not (torch.isfinite(weights).all() and (weights > 0).all()):
            raise ValueError("weights must be positive and finite")
        self.maps.set_location_scale(loc, scale)
        self.classifier.set_constant(weights.log() - weights.sum().log())
