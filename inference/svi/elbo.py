r"""The Rao-Blackwellized ELBO of a CWM guide.

For a guide q = CWM over the unconstrained latent vector u, with maps T_k and classifier w,

```text
ELBO = E_{z ~ N(0, I)} sum_k w_k(z) (log p(T_k z) - log q(T_k z)),
```

where p is the model's joint density of (u, data) including the Jacobian of the maps from
u to the constrained latents. The sum over the discrete component choice is exact for
every reparameterized z; the K model evaluations are one call with a particle plate.
"""

from __future__ import annotations

import pyro.poutine as poutine
import torch
from pyro.infer import ELBO, TraceEnum_ELBO
from pyro.infer.enum import get_importance_trace
from torch import Tensor, nn
from torch.func import functional_call

from pyro_cwm.distributions.cwm import ClassifierWeightedMixture
from pyro_cwm.guides.autocwm import AutoCWM
from pyro_cwm.guides.log_joint import unconstrained_log_joint


def cwm_guides(guide) -> list[AutoCWM]:
    """The AutoCWM guides in ``guide``: itself, or the parts of an ``AutoGuideList``."""
    if isinstance(guide, AutoCWM):
        return [guide]
    if isinstance(guide, torch.nn.Module):
        return [module for module in guide.modules() if isinstance(module, AutoCWM)]
    return []


class _Method(nn.Module):
    """``module.method`` as a module's forward (for ``functional_call``)."""

    def __init__(self, module: nn.Module, method: str) -> None:
        super().__init__()
        self.module, self.method = module, method

    def forward(self, *args):
        return getattr(self.module, self.method)(*args)


class _Detached(nn.Module):
    """A stand-in for a CWM's maps or classifier that evaluates them with their
    parameters detached: values are unchanged, gradients flow only through the inputs."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self._module = [module]  # not a submodule: nothing to register or move
        for name in ("dim", "num_components", "context_dim"):
            if hasattr(module, name):
                setattr(self, name, getattr(module, name))

    def _call(self, method: str, *args):
        module = self._module[0]
        params = {f"module.{n}": p.detach() for n, p in module.named_parameters()}
        return functional_call(_Method(module, method), params, args)

    def forward(self, *args):
        return self._call("forward", *args)

    def inverse(self, *args):
        return self._call("inverse", *args)


def detached_parameters(posterior: ClassifierWeightedMixture) -> ClassifierWeightedMixture:
    """The same CWM with its parameters cut from the graph (for the path gradient)."""
    return ClassifierWeightedMixture(
        posterior.reference,
        _Detached(posterior.maps),
        _Detached(posterior.classifier),
        posterior.context,
    )


RICH_MAP_PARTICLES = 4


class CWMELBO(ELBO):
    """The Rao-Blackwellized ELBO for guides with [`AutoCWM`][pyro_cwm.guides.AutoCWM] parts.

    Each of ``num_particles`` reparameterized draws z gives all K component images
    T_k(z); their model and guide log-densities are weighted by the classifier's w_k(z)
    and summed, so the gradient reaches the classifier without a score function.

    For a single AutoCWM guide this runs as one vectorized call of the model on the K x
    ``num_particles`` images (the fast path). Any other guide (an ``AutoGuideList`` of
    AutoCWM with ``AutoNormal`` or ``AutoDelta`` parts, for local latents in subsampled
    plates) is trained with Pyro's ``TraceEnum_ELBO`` (vectorized particles), which sums
    AutoCWM's enumerated component site out: the same estimator. Discrete model sites
    marked for parallel enumeration (``config_enumerate``) are summed out on both paths.

    Components must not collapse: from a random start, reverse KL tends to give one
    component all the weight, and a component that loses its weight stops moving (its
    gradient is scaled by it). So for the first ``classifier_warmup`` steps the
    classifiers are held constant (their gradients are dropped; they start uniform): every
    component moves, with weight 1/K, to the mode nearest its spread start (see
    [`AutoCWM`][pyro_cwm.guides.AutoCWM]), and only then do the weights adapt. The counter
    is ``self.step``; use a new CWMELBO (or reset ``step``) for a new fit.

    The gradient is the path derivative ("sticking the landing", Roeder, Wu and Duvenaud
    2017): in ``log q(T_k z)`` the guide's parameters enter only through the point T_k z,
    not through the density's own parameters. The dropped term, the score
    ``grad log q(x)`` at fixed x, has expectation zero under q (the classifier's weights
    w_k(z) still carry theirs: the sum over k is exact), so the estimate stays unbiased,
    costs the same, and its variance vanishes as q approaches the posterior: with one
    particle and ``fit_svi``'s defaults, the KL on the 100-D regression of the model zoo
    after 3,000 steps fell from 0.31 to 0.0002, and the worst mean error on kilpisjarvi
    from 0.064 to 0.007 sd. (The ``TraceEnum_ELBO`` path, for guide lists, keeps Pyro's
    full gradient.)

    Args:
        num_particles: number of draws z per step. None (default): 1 for location-scale
            maps, ``RICH_MAP_PARTICLES`` (4) for the richer ones (``affine``, ``flow``,
            ``maf``; also the autoregressive flow that AutoCWM's ``map="auto"`` picks for
            a funnel), whose many parameters one draw moves too noisily: on Neal's 10-D
            funnel with the autoregressive flow and ``fit_svi``'s defaults, KL 0.128 at
            2,000 steps and 0.068 at 8,000 with one draw, 0.030 and 0.031 with four, for
            7% more time (the draws are one vectorized call).
        classifier_warmup: number of steps with a constant classifier (0: none).
        path_gradient: use the path derivative above (False: the full reparameterization
            gradient, score term included, as ``TraceEnum_ELBO`` computes it).
        max_plate_nesting: for the ``TraceEnum_ELBO`` path (default: guessed from a run
            of the model and guide, as Pyro does).

    Raises:
        TypeError: (at the first step) if the guide has no AutoCWM part.
    """

    def __init__(
        self,
        num_particles: int | None = None,
        classifier_warmup: int = 200,
        max_plate_nesting: float = float("inf"),
        path_gradient: bool = True,
    ) -> None:
        self._particles_by_map = num_particles is None
        num_particles = 1 if num_particles is None else num_particles
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting)
        if classifier_warmup < 0:
            raise ValueError(f"classifier_warmup must be >= 0, got {classifier_warmup}")
        self.classifier_warmup = classifier_warmup
        self.path_gradient = bool(path_gradient)
        self.step = 0
        self._enum_elbo = TraceEnum_ELBO(
            num_particles=num_particles,
            vectorize_particles=True,
            max_plate_nesting=max_plate_nesting,
        )

    def _get_trace(self, model, guide, args, kwargs):
        """One (model trace, guide trace) pair, as ``Trace_ELBO`` draws it (for ELBO helpers)."""
        return get_importance_trace("flat", self.max_plate_nesting, model, guide, args, kwargs)

    def elbo_terms(self, model, guide, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Per-particle ELBO contributions (num_particles,) and the component weights.

        The fast path, for a single AutoCWM guide. Returns ``(values, log_w)``: the mean
        of ``values`` is the differentiable ELBO estimate; ``log_w`` (num_particles, K) are
        the classifier's log-weights at each z.

        Raises:
            TypeError: if ``guide`` is not an AutoCWM.
        """
        if not isinstance(guide, AutoCWM):
            raise TypeError(
                f"CWMELBO.elbo_terms needs an AutoCWM guide, got {type(guide).__name__}"
            )
        if guide.prototype_trace is None:
            with poutine.block():
                guide(*args, **kwargs)
        posterior = guide.get_posterior(*args, **kwargs)
        particles = self.num_particles
        if self._particles_by_map and guide.map_chosen != "location_scale":
            particles = RICH_MAP_PARTICLES
        images, log_w = posterior.rsample_components((particles,))
        p, k, d = images.shape
        log_q = (detached_parameters(posterior) if self.path_gradient else posterior).log_prob(
            images
        )
        log_p = unconstrained_log_joint(model, guide, images.reshape(p * k, d), *args, **kwargs)
        values = (log_w.exp() * (log_p.reshape(p, k) - log_q)).sum(-1)
        return values, log_w

    def differentiable_loss(self, model, guide, *args, **kwargs) -> Tensor:
        """The negative ELBO estimate, differentiable in the guide's and model's parameters."""
        if isinstance(guide, AutoCWM):
            values, _ = self.elbo_terms(model, guide, *args, **kwargs)
            return -values.mean()
        if not cwm_guides(guide):
            raise TypeError(
                f"CWMELBO needs a guide with an AutoCWM part, got {type(guide).__name__}; use "
                "Trace_ELBO (or TraceEnum_ELBO) for other guides"
            )
        return self._enum_elbo.differentiable_loss(model, guide, *args, **kwargs)

    def loss(self, model, guide, *args, **kwargs) -> float:
        if not isinstance(guide, AutoCWM) and cwm_guides(guide):
            # TraceEnum_ELBO refuses differentiable_loss under no_grad; it has its own.
            return self._enum_elbo.loss(model, guide, *args, **kwargs)
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        if self.step < self.classifier_warmup:
            for cwm_guide in cwm_guides(guide):
                for param in cwm_guide.cwm.classifier.parameters():
                    param.grad = None
        self.step += 1
        return loss.item()
