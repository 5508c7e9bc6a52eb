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

from contextlib import contextmanager

import pyro.poutine as poutine
import torch
from pyro.infer import ELBO, TraceEnum_ELBO
from pyro.infer.enum import get_importance_trace
from pyro.poutine.enum_messenger import EnumMessenger
from pyro.poutine.messenger import Messenger
from pyro.util import get_rng_state, set_rng_state
from torch import Tensor

from pyro_cwm.guides.autocwm import AutoCWM
from pyro_cwm.guides.log_joint import MODEL_ERRORS, VECTORIZE_HINT, unconstrained_log_joint
from pyro_cwm.guides.rao_blackwell import (
    ComponentChoice,
    CWMReparam,
    path_log_prob,
    rao_blackwellize,
)


def cwm_guides(guide) -> list[AutoCWM]:
    """The AutoCWM guides in ``guide``: itself, or the parts of an ``AutoGuideList``."""
    if isinstance(guide, AutoCWM):
        return [guide]
    if isinstance(guide, torch.nn.Module):
        return [module for module in guide.modules() if isinstance(module, AutoCWM)]
    return []


class _EventShapeError(ValueError):
    """A guide's CWM and the model's site disagree in event shape."""


class _MatchCWMSites(Messenger):
    """Checks the model's sites against the event shapes of the guide's CWM sites."""

    def __init__(self, reparam: CWMReparam) -> None:
        super().__init__()
        self.reparam = reparam

    def _pyro_sample(self, msg) -> None:
        shape = self.reparam.event_shapes.get(msg["name"])
        if shape is not None and msg["fn"].event_shape != shape:
            raise _EventShapeError(
                f"the guide's CWM at site {msg['name']!r} has event shape {tuple(shape)}, "
                f"the model's site has {tuple(msg['fn'].event_shape)}: build the CWM with "
                "dim equal to the size of the model's site (a vector site: "
                "dist.Normal(...).to_event(1))"
            )


def _component_sum(model_trace, guide_trace) -> Tensor | None:
    """The ELBO (summed over particles) of traces whose only enumerated site is one CWM
    component choice, weighted in place: ``sum_k w_k * log_prob`` for every factor with the
    component's enumeration dimension, ``log_prob`` itself for the others. None where
    the traces need ``TraceEnum_ELBO``'s contraction: another enumerated or
    non-reparameterized site, a model latent the guide lacks, or a factor that depends on
    the component outside its plates."""
    enumerated = [
        site
        for site in guide_trace.nodes.values()
        if site["type"] == "sample" and site["infer"].get("_enumerate_dim") is not None
    ]
    if len(enumerated) != 1 or not isinstance(enumerated[0]["fn"], ComponentChoice):
        return None
    component = enumerated[0]
    for site in guide_trace.nodes.values():
        if site["type"] == "sample" and site is not component and not site["fn"].has_rsample:
            return None
    for name, site in model_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"]:
            continue
        if name not in guide_trace.nodes or site["infer"].get("enumerate"):
            return None
    dim = component["infer"]["_enumerate_dim"]
    weights = component["unscaled_log_prob"].exp()
    plates = {f.name for f in component["cond_indep_stack"] if f.vectorized}
    elbo = 0.0
    for sign, trace in ((1.0, model_trace), (-1.0, guide_trace)):
        for site in trace.nodes.values():
            if site["type"] != "sample":
                continue
            log_prob = site["log_prob"]
            if log_prob.dim() >= -dim and log_prob.shape[dim] > 1:
                if not plates <= {f.name for f in site["cond_indep_stack"] if f.vectorized}:
                    return None
                log_prob = weights * log_prob
            elbo = elbo + sign * log_prob.sum()
    return elbo


RICH_MAP_PARTICLES = 4
SHARED_FLOW_PARTICLES = 32
"""Draws per step for maps that share one inverse step (``FlowMaps(flow="iaf")``): they
train with the full gradient, whose variance, unlike the path gradient's, stays as q
approaches the posterior; with 4 draws their KL was 2-8 times the autoregressive flow's."""

TRAVEL_CHECK = 50
"""Steps between CWMELBO's checks of whether a travelling AutoCWM's components arrived."""
TRAVEL_TOLERANCE = 0.5
"""They arrived when their means moved less than this many of their own sds (root mean
square over components and coordinates) in ``2 * TRAVEL_CHECK`` steps."""
TRAVEL_MAX_HOLD = 10
"""The classifier of a travelling AutoCWM is held for at most this many warm-ups."""

ENUMERATED_MODEL_NOTE = (
    "CWMELBO ran the model once at all K component images of the guide's CWM sites (an "
    "enumeration dimension left of the model's plates, as TraceEnum_ELBO does): a model "
    "that does not broadcast over extra leading dimensions fails there. A single AutoCWM "
    "guide runs such a model point by point instead; with this guide, make the model "
    f"broadcast. {VECTORIZE_HINT}."
)


@contextmanager
def _noting_broadcast():
    """Adds ``ENUMERATED_MODEL_NOTE`` to an error raised while the model runs at all
    component images at once."""
    try:
        yield
    except MODEL_ERRORS as error:
        noted = ENUMERATED_MODEL_NOTE in getattr(error, "__notes__", ())
        if not (noted or isinstance(error, _EventShapeError)):
            error.add_note(ENUMERATED_MODEL_NOTE)
        raise


class CWMELBO(ELBO):
    """The Rao-Blackwellized ELBO for guides that hold CWMs.

    Each of ``num_particles`` reparameterized draws u gives all K component images
    T_k(u); their model and guide log-densities are weighted by the classifier's w_k(u)
    and summed, so the gradient reaches the classifier without a score function.

    - A single [`AutoCWM`][pyro_cwm.guides.AutoCWM] guide runs as one vectorized call of
      the model on the K x ``num_particles`` images (the fast path).
    - Any other guide (``pyro.sample(name, cwm(context))`` sites written by hand, inside
      plates and beside ordinary sites; an ``AutoGuideList`` with AutoCWM parts) runs
      through [`rao_blackwellize`][pyro_cwm.guides.rao_blackwellize], which sums every
      component choice out: with one CWM site and no enumerated model site, by weighting
      the factors in place; otherwise through Pyro's ``TraceEnum_ELBO`` (vectorized
      particles), which also sums discrete model sites marked for enumeration.

    For the first ``classifier_warmup`` steps the classifiers are held constant (their
    gradients dropped): every component moves, with weight 1/K, to the mode nearest its
    start before the weights adapt; else one component tends to take all the weight, and
    one without weight stops moving. An AutoCWM whose components start away from the mass
    (``guide.travelling``: a guide-list part, which cannot climb the density) stays held
    until they arrive (``TRAVEL_TOLERANCE``). The counter is ``self.step``.

    The gradient is the path derivative (Roeder, Wu and Duvenaud 2017): the parameters
    enter ``log q(T_k u)`` only through the point; the dropped score term has expectation
    zero and vanishing variance as q approaches the posterior. An ``AutoGuideList`` and
    maps that share one inverse step (``FlowMaps(flow="iaf")``) keep the full gradient.

    Args:
        num_particles: draws u per step. None (default): 1, or ``RICH_MAP_PARTICLES``
            (4) for an AutoCWM whose maps are richer than location-scale, or
            ``SHARED_FLOW_PARTICLES`` (32) for one whose maps share an inverse step.
        classifier_warmup: number of steps with constant classifiers (0: none).
        path_gradient: use the path derivative (False: the full gradient, score term
            included, as ``TraceEnum_ELBO`` computes it).
        max_plate_nesting: for the ``TraceEnum_ELBO`` path (default: guessed from a run
            of the model and guide, as Pyro does).

    Raises:
        ValueError: (at a step) where a guide's CWM and the model's site disagree in
            event shape, naming the site.
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
        self._reparam = CWMReparam(self.path_gradient)
        self._direct: bool | None = None  # does the guide take _direct_loss? (first step)
        # AutoCWM parts that start away from the mass (by id): their components' recent
        # means, or None once they arrived.
        self._travel: dict[int, list[Tensor] | None] = {}
        self._settled = False  # past the warm-up with every part arrived

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
            shared = posterior.maps.shares_inverse
            particles = SHARED_FLOW_PARTICLES if shared else RICH_MAP_PARTICLES
        if posterior.maps.shares_inverse:
            # The density at the images without inverting the flow: the full gradient.
            images, log_w, log_q = posterior.rsample_components_with_log_prob((particles,))
        else:
            images, log_w = posterior.rsample_components((particles,))
            if self.path_gradient:
                log_q = path_log_prob(posterior, images)
            else:
                log_q = posterior.log_prob(images)
        p, k, d = images.shape
        log_p = unconstrained_log_joint(model, guide, images.reshape(p * k, d), *args, **kwargs)
        values = (log_w.exp() * (log_p.reshape(p, k) - log_q)).sum(-1)
        return values, log_w

    def _enumerated(self, model, guide):
        """The model (checked against the guide's CWM sites) and the guide with its CWM
        sites summed out, for ``TraceEnum_ELBO``."""
        return _MatchCWMSites(self._reparam)(model), rao_blackwellize(guide, reparam=self._reparam)

    def differentiable_loss(self, model, guide, *args, **kwargs) -> Tensor:
        """The negative ELBO estimate, differentiable in the guide's and model's parameters."""
        if isinstance(guide, AutoCWM):
            values, _ = self.elbo_terms(model, guide, *args, **kwargs)
            return -values.mean()
        model, guide = self._enumerated(model, guide)
        with _noting_broadcast():
            loss = self._direct_loss(model, guide, args, kwargs)
            if loss is None:
                loss = self._enum_elbo.differentiable_loss(model, guide, *args, **kwargs)
        return loss

    def _direct_loss(self, model, guide, args, kwargs) -> Tensor | None:
        """The loss of a guide with one CWM site and a model without enumerated sites, from
        one run of each (``_component_sum``); None where ``TraceEnum_ELBO`` is needed (the
        first step decides, ``self._direct``)."""
        if self._direct is False:
            return None
        elbo = self._enum_elbo
        if elbo.max_plate_nesting == float("inf"):
            elbo._guess_max_plate_nesting(model, guide, args, kwargs)
        if elbo.num_particles > 1:
            model, guide = (
                elbo._vectorized_num_particles(model),
                elbo._vectorized_num_particles(guide),
            )
        guide = EnumMessenger(first_available_dim=-1 - elbo.max_plate_nesting)(guide)
        # A first step that finds the contraction needed leaves the random state as it was.
        state = get_rng_state() if self._direct is None else None
        model_trace, guide_trace = get_importance_trace(
            "flat", elbo.max_plate_nesting, model, guide, args, kwargs
        )
        value = _component_sum(model_trace, guide_trace)
        self._direct = value is not None
        if value is None and state is not None:
            set_rng_state(state)
        return None if value is None else -value / elbo.num_particles

    def loss(self, model, guide, *args, **kwargs) -> float:
        if not isinstance(guide, AutoCWM):
            model, guide = self._enumerated(model, guide)
            with _noting_broadcast():
                with torch.no_grad():
                    loss = self._direct_loss(model, guide, args, kwargs)
                if loss is not None:
                    return loss.item()
                # TraceEnum_ELBO refuses differentiable_loss under no_grad; it has its own.
                return self._enum_elbo.loss(model, guide, *args, **kwargs)
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        warming = self.step < self.classifier_warmup
        classifiers = []
        if warming or not self._settled:  # past the holds: no per-step search for parts
            parts = cwm_guides(guide)
            classifiers = [p.cwm.classifier for p in parts if warming or self._travelling(p)]
            self._settled = not warming and all(self._travel[id(p)] is None for p in parts)
        if warming:
            classifiers += list(self._reparam.classifiers.values())
        for classifier in classifiers:
            for param in classifier.parameters():
                param.grad = None
        self.step += 1
        return loss.item()

    def _travelling(self, part: AutoCWM) -> bool:
        """Whether ``part``'s components are still on their way to the mass (past the
        warm-up; checked every ``TRAVEL_CHECK`` steps; ``part.travelling`` is cleared on
        arrival)."""
        key = id(part)
        if self.classifier_warmup == 0:  # no warm-up asked for: no hold either
            self._travel[key] = None
        means = self._travel.setdefault(key, [])
        if means is None:
            return False
        if means and self.step % TRAVEL_CHECK:
            return True
        arrived = not bool(getattr(part, "travelling", False))
        if not arrived:
            mean, sd = _component_moments(part.get_posterior())
            means.append(mean)
            if len(means) == 3:
                shift = (means[-1] - means.pop(0)) / sd
                arrived = shift.square().mean().sqrt().item() < TRAVEL_TOLERANCE
        if arrived or self.step >= TRAVEL_MAX_HOLD * self.classifier_warmup:
            if hasattr(part, "travelling"):
                part.travelling.fill_(False)
            self._travel[key] = None
            return False
        return True


@torch.no_grad()
def _component_moments(posterior, num_samples: int = 256) -> tuple[Tensor, Tensor]:
    """Each component's mean and sd (K, d) from ``num_samples`` reference draws (seeded:
    the same parameters give the same values, on every process)."""
    device = posterior.reference.mean.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        images, _ = posterior.rsample_components((num_samples,))
    return images.mean(0), images.std(0).clamp(min=1e-30)
