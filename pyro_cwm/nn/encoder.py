"""An amortized CWM: a feature network of the data, then a CWM conditioned on the features."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from pyro_cwm.distributions.cwm import ClassifierWeightedMixture
from pyro_cwm.nn.checks import check_positive_int
from pyro_cwm.nn.cwm import CWM


class CWMEncoder(nn.Module):
    """The variational posterior ``q(z | x)`` of a VAE (or any amortized guide) as a CWM.

    ``encoder(x)`` computes ``h = features(x)`` and returns ``cwm(h)``: the maps and the
    classifier of a [`CWM`][pyro_cwm.nn.CWM] conditioned on h, a distribution with batch
    shape ``h.shape[:-1]`` and event shape ``(dim,)``. In a guide, inside the data plate:

    ```python
    pyro.sample("z", encoder(x))
    ```

    and train with [`CWMELBO`][inference.CWMELBO] (or ``TraceEnum_ELBO`` on
    [`rao_blackwellize(guide)`][pyro_cwm.guides.rao_blackwellize]). The components start
    spread over N(0, I) and independent of x (the CWM's start), the CWM standardizes h
    with the first batch's mean and sd, and CWMELBO's classifier warm-up lets each
    component move to a mode before the weights adapt.

    Args:
        features: the user's feature network, ``x -> h`` of shape (..., feature_dim).
        feature_dim: width of h.
        dim: dimension of the latent z.
        num_components: number of components K.
        hidden_dims: hidden widths of the classifier and of the maps' networks on h.
        map: the maps family (see [`CWM`][pyro_cwm.nn.CWM]).
        map_options: options of the maps family.

    Raises:
        ValueError: for non-positive dimensions, or (when called) features whose width
            is not ``feature_dim``.
    """

    def __init__(
        self,
        features: nn.Module,
        feature_dim: int,
        dim: int,
        num_components: int = 4,
        hidden_dims: Sequence[int] = (64,),
        map: str = "location_scale",
        map_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not callable(features):
            raise TypeError(f"features must be a module or callable, got {type(features)}")
        self.features = features
        self.feature_dim = check_positive_int("feature_dim", feature_dim)
        self.cwm = CWM(
            dim,
            num_components,
            hidden_dims=hidden_dims,
            map=map,
            context_dim=self.feature_dim,
            map_options=map_options,
        )

    def forward(self, x: Tensor) -> ClassifierWeightedMixture:
        """The CWM ``q(z | x)``, batch shape ``features(x).shape[:-1]``."""
        h = self.features(x)
        if h.dim() == 0 or h.shape[-1] != self.feature_dim:
            raise ValueError(
                f"features(x) must have shape (..., {self.feature_dim}) (feature_dim), got "
                f"{tuple(h.shape)}"
            )
        return self.cwm(h)
