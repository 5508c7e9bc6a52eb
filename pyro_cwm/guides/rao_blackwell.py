r"""A CWM site in any guide, trained with the Rao-Blackwellized estimator.

A guide site ``pyro.sample("z", cwm(context))`` is sampled through three sites:

- ``z_base``: the reference draw ``u ~ N(0, I)``, reparameterized;
- ``z_component``: the component ``k ~ Categorical(w(u))``, marked for parallel enumeration;
- ``z`` itself: the image ``T_k(u)`` as a ``Delta`` whose log-density makes the three
  sites' total ``log q_CWM(T_k u)``.

Under ``TraceEnum_ELBO`` the component is enumerated: ``z`` holds all K images along an
enumeration dimension left of the guide's plates, the model runs once on all of them, and
the ELBO weights each image by ``w_k(u)``:

```text
ELBO = E_u sum_k w_k(u) (log p(T_k u, x) - log q(T_k u)),
```

exact in k for every reparameterized u, so the classifier gets its gradient without a
score function. Outside an enumerating ELBO (``Predictive``, a plain run) one component
is drawn and ``z`` is an ordinary draw of the CWM.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.distributions.util import sum_rightmost
from pyro.infer.reparam.reparam import Reparam
from pyro.infer.reparam.strategies import Strategy
from torch import Tensor, nn

from pyro_cwm.distributions.cwm import ClassifierWeightedMixture

__all__ = [
    "CWMReparam",
    "ImageDelta",
    "rao_blackwellize",
    "path_log_prob",
    "sample_components",
]


class ComponentChoice(dist.Categorical):
    """A CWM's component site: summed out under enumeration, refused by other ELBOs.

    A score-function ELBO such as ``Trace_ELBO`` would draw the component and need its
    score function, whose variance the Rao-Blackwellized estimator avoids by design.
    """

    def score_parts(self, value, *args, **kwargs):
        if value.dim() <= len(self.batch_shape):
            raise TypeError(
                "a CWM's component choice is discrete; train the guide with "
                "inference.CWMELBO or pyro.infer.TraceEnum_ELBO, which sum it out exactly "
                "(Trace_ELBO and other score-function ELBOs would draw it)"
            )
        return super().score_parts(value, *args, **kwargs)


class ImageDelta(dist.Delta):
    """A ``Delta`` at the K component images whose batch shape is that of the plates alone.

    Under enumeration a site's value holds the K images along an enumeration dimension
    left of its plates (the first ``num_enum_dims`` of ``v``'s batch dimensions). As for
    an enumerated site itself, whose distribution keeps the plates' batch shape while its
    value holds the enumerated values, these dimensions are the value's: ``batch_shape``
    is the rest, without leading dimensions of size one, the shape a guide without
    enumeration would give the site. Pyro's model-guide shape check then compares the
    site with the model's (a matrix site such as ``LKJCholesky`` beside a plate failed
    it), and ``log_prob`` broadcasts over the images.
    """

    def __init__(self, v: Tensor, log_density=0.0, event_dim: int = 0, num_enum_dims: int = 1):
        super().__init__(v, log_density=log_density, event_dim=event_dim)
        self.log_density = self.log_density.expand(super().batch_shape)
        self.num_enum_dims = num_enum_dims
        batch_shape = self.batch_shape[num_enum_dims:]
        while batch_shape and batch_shape[0] == 1:
            batch_shape = batch_shape[1:]
        self._batch_shape = batch_shape

    def expand(self, batch_shape, _instance=None):
        # The enumeration dimensions keep their places: the new batch shape takes the
        # place of the plate dimensions, size-one dimensions that were left out included.
        batch_shape = torch.Size(batch_shape)
        lead = self.v.shape[: self.num_enum_dims]
        plates = self.v.shape[self.num_enum_dims : self.v.dim() - self.event_dim]
        keep = len(plates) - len(batch_shape)
        if keep < 0:
            raise ValueError(
                f"cannot expand the images of shape {tuple(self.v.shape)} to the batch shape "
                f"{tuple(batch_shape)}: it reaches the enumeration dimension"
            )
        shape = lead + plates[:keep] + batch_shape
        v = self.v.expand(shape + self.event_shape)
        return ImageDelta(v, self.log_density.expand(shape), self.event_dim, self.num_enum_dims)

    def log_prob(self, x: Tensor) -> Tensor:
        log_prob = (x == self.v).type(x.dtype).log()
        return sum_rightmost(log_prob, self.event_dim) + self.log_density


def path_log_prob(posterior: ClassifierWeightedMixture, value: Tensor) -> Tensor:
    """``posterior.log_prob(value)`` whose gradient flows through ``value`` alone: the
    CWM's parameters and context are held fixed (the path derivative)."""
    params = [
        p
        for module in (posterior.maps, posterior.classifier)
        for p in module.parameters()
        if p.requires_grad
    ]
    if posterior.context is not None:
        posterior = ClassifierWeightedMixture(
            posterior.reference,
            posterior.maps,
            posterior.classifier,
            posterior.context.detach(),
            validate_args=False,
        )
    # Parameters that do not require grad are constants of the graph recorded below: the
    # same values, no gradient to them, and none of functional_call's per-call cost.
    for p in params:
        p.requires_grad_(False)
    try:
        return posterior.log_prob(value)
    finally:
        for p in params:
            p.requires_grad_(True)


def sample_components(
    posterior: ClassifierWeightedMixture,
    base_name: str,
    component_name: str,
    path_gradient: bool = False,
) -> tuple[Tensor, Tensor]:
    """Sample the reference and component sites of ``posterior``; return the image and the
    log-density that makes the sites' total ``log q_CWM(image)``.

    Under enumeration the image has shape ``(K, 1, ..., 1, *batch, d)``, the K images
    along the component site's enumeration dimension; otherwise ``(*batch, d)``.
    With ``path_gradient``, ``log q_CWM`` is computed with the CWM's parameters
    detached (the path derivative of Roeder, Wu and Duvenaud 2017); the weights
    ``w_k(u)`` keep their gradient.
    """
    image, log_density, _ = _sample_components(posterior, base_name, component_name, path_gradient)
    return image, log_density


def _sample_components(
    posterior: ClassifierWeightedMixture,
    base_name: str,
    component_name: str,
    path_gradient: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``sample_components``, and under enumeration the images' log-weights ``log w_k(u)``
    (the image's shape without its last dimension; None otherwise)."""
    reference = posterior.reference.expand(posterior.batch_shape)
    u = pyro.sample(base_name, reference, infer={"is_auxiliary": True})
    images = posterior.maps(u, posterior.context)  # (*b, K, d)
    log_w = posterior.classifier(u, posterior.context)  # (*b, K)
    k = pyro.sample(
        component_name,
        ComponentChoice(logits=log_w),
        infer={"enumerate": "parallel", "is_auxiliary": True},
    )
    batch_dims = log_w.dim() - 1
    enumerated = k.dim() > batch_dims  # k = arange(K) along a dimension left of u's
    if enumerated:
        pad = (1,) * (k.dim() - 1 - batch_dims)
        image = images.movedim(-2, 0).reshape(
            images.shape[-2:-1] + pad + images.shape[:-2] + images.shape[-1:]
        )
        log_w_k = log_w.movedim(-1, 0).reshape(log_w.shape[-1:] + pad + log_w.shape[:-1])
    else:
        index = k[..., None, None].expand(*k.shape, 1, images.shape[-1])
        image = images.gather(-2, index).squeeze(-2)
        log_w_k = log_w.gather(-1, k[..., None]).squeeze(-1)
    log_q = path_log_prob(posterior, image) if path_gradient else posterior.log_prob(image)
    log_density = log_q - reference.log_prob(u) - log_w_k
    return image, log_density, (log_w_k if enumerated else None)


def _cwm_of(site_name: str, fn) -> ClassifierWeightedMixture | None:
    """The CWM at a site, None if the site holds no CWM; a wrapped CWM is refused."""
    if isinstance(fn, ClassifierWeightedMixture):
        return fn
    inner = fn
    while hasattr(inner, "base_dist"):
        inner = inner.base_dist
        if isinstance(inner, ClassifierWeightedMixture):
            raise ValueError(
                f"the guide site {site_name!r} holds a CWM wrapped in "
                f"{type(fn).__name__}: the component choice of each batch element must be "
                "summed out on its own, so put the batch dimensions in pyro.plate "
                "instead of .to_event(), and use poutine.mask instead of .mask()"
            )
    return None


class CWMReparam(Reparam):
    """Samples a guide's CWM site through an enumerated component choice (see
    [`rao_blackwellize`][pyro_cwm.guides.rao_blackwellize]).

    Args:
        path_gradient: compute ``log q`` with the CWM's parameters detached (the path
            derivative); its value is unchanged.

    Attributes:
        classifiers: the classifier modules of the CWM sites seen so far, by site name.
    """

    def __init__(self, path_gradient: bool = False) -> None:
        self.path_gradient = bool(path_gradient)
        self.classifiers: dict[str, nn.Module] = {}
        self.event_shapes: dict[str, torch.Size] = {}

    def apply(self, msg):
        name, fn = msg["name"], msg["fn"]
        posterior = _cwm_of(name, fn)
        if posterior is None:
            raise TypeError(f"CWMReparam at site {name!r} needs a CWM, got {type(fn).__name__}")
        if msg["is_observed"]:
            return msg
        if posterior._validate_args:
            posterior.check_context(name)
        self.classifiers[name] = posterior.classifier
        self.event_shapes[name] = posterior.event_shape
        image, log_density = sample_components(
            posterior, f"{name}_base", f"{name}_component", self.path_gradient
        )
        new_fn = dist.Delta(image, log_density=log_density, event_dim=1)
        return {"fn": new_fn, "value": image, "is_observed": False}


class _CWMSites(Strategy):
    """Gives every latent CWM site the same [`CWMReparam`][pyro_cwm.guides.CWMReparam]."""

    def __init__(self, reparam: CWMReparam) -> None:
        super().__init__()
        self.reparam = reparam

    def configure(self, msg: dict) -> Reparam | None:
        if msg["is_observed"] or _cwm_of(msg["name"], msg["fn"]) is None:
            return None
        return self.reparam


def rao_blackwellize(
    guide: Callable, path_gradient: bool = False, reparam: CWMReparam | None = None
) -> Callable:
    """The guide with each of its CWM sites summed over the component choice.

    Every latent site whose distribution is a
    [`ClassifierWeightedMixture`][pyro_cwm.distributions.ClassifierWeightedMixture] (``cwm()`` or
    ``cwm(context)``, inside any plates) is sampled as
    [`pyro_cwm.guides.rao_blackwell`][pyro_cwm.guides.rao_blackwell] describes, so that
    Pyro's ``TraceEnum_ELBO`` trains it with the Rao-Blackwellized estimator; other sites
    are untouched. [`CWMELBO`][inference.CWMELBO] applies it by itself.

    Example:
        ```python
        svi = SVI(model, rao_blackwellize(guide), optim, TraceEnum_ELBO(max_plate_nesting=1))
        ```

    Args:
        guide: a Pyro guide (callable).
        path_gradient: see [`CWMReparam`][pyro_cwm.guides.CWMReparam].
        reparam: the reparameterizer to use (default: a new ``CWMReparam(path_gradient)``).

    Raises:
        ValueError: (when the guide runs) for a CWM wrapped in ``Independent`` or
            ``MaskedDistribution``, or a context with NaN, naming the site.
    """
    reparam = CWMReparam(path_gradient) if reparam is None else reparam
    return poutine.reparam(guide, config=_CWMSites(reparam))
