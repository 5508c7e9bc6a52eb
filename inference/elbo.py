r"""The Rao-Blackwellized ELBO of a CWM guide, and the model's density in unconstrained space.

For a guide q = CWM over the unconstrained latent vector u, with maps T_k and classifier w,

.. math::
    \mathrm{ELBO} = E_{z \sim N(0, I)} \sum_k w_k(z) \big(\log p(T_k z) - \log q(T_k z)\big),

where p is the model's joint density of (u, data) including the Jacobian of the maps from
u to the constrained latents. The sum over the discrete component choice is exact for
every reparameterized z; the K model evaluations are one call with a particle plate.
"""

from __future__ import annotations

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.transforms import biject_to
from pyro.distributions.util import sum_rightmost
from pyro.infer import ELBO
from pyro.infer.enum import get_importance_trace
from torch import Tensor

from pyro_cwm.guides.autocwm import AutoCWM


def _per_particle(x, num: int, nesting: int) -> Tensor:
    """Reduce a log-density term of shape (..., [num], *plates) to shape (num,)."""
    if not torch.is_tensor(x):
        return torch.tensor(float(x)).expand(num)
    if x.dim() > nesting:
        x = x.sum(dim=tuple(range(x.dim() - nesting, x.dim()))) if nesting else x
        return x.reshape(-1).expand(num) if x.numel() == 1 else x.reshape(num)
    return x.sum().expand(num)


def unconstrained_log_joint(model, guide: AutoCWM, latent: Tensor, *args, **kwargs) -> Tensor:
    """``log p(data, u)`` of ``model`` at unconstrained latent vectors ``u``, shape (N,).

    ``latent`` has shape (N, latent_dim) in the packing of ``guide`` (an AutoContinuous
    that has been set up). The N points are evaluated in one run of the model under a
    particle plate left of the model's plates. The log-Jacobian of the maps from ``u`` to
    the constrained sites is included, so this is the density that the guide's
    unconstrained distribution approximates (up to the evidence).
    """
    num = latent.shape[0]
    nesting = guide.max_plate_nesting
    batched = latent.reshape((num,) + (1,) * nesting + latent.shape[-1:])
    values = {}
    log_det = latent.new_zeros(num)
    for site, unconstrained in guide._unpack_latent(batched):
        transform = biject_to(site["fn"].support)
        value = transform(unconstrained)
        ladj = transform.log_abs_det_jacobian(unconstrained, value)
        ladj = sum_rightmost(ladj, ladj.dim() - value.dim() + site["fn"].event_dim)
        log_det = log_det + _per_particle(ladj, num, nesting)
        values[site["name"]] = value
    with pyro.plate("_cwm_particles", num, dim=-(nesting + 1)):
        trace = poutine.trace(poutine.condition(model, data=values)).get_trace(*args, **kwargs)
    trace.compute_log_prob()
    log_p = log_det
    for site in trace.nodes.values():
        if site["type"] == "sample":
            log_p = log_p + _per_particle(site["log_prob"], num, nesting)
    return log_p


class CWMELBO(ELBO):
    """The Rao-Blackwellized ELBO for :class:`pyro_cwm.guides.AutoCWM` guides.

    Each of ``num_particles`` reparameterized draws z gives all K component images
    T_k(z); their model and guide log-densities are weighted by the classifier's w_k(z)
    and summed, so the gradient reaches the classifier without a score function. The K x
    ``num_particles`` model evaluations run as one vectorized call.

    Args:
        num_particles: number of draws z per step.

    Raises:
        TypeError: (at the first step) if the guide is not an AutoCWM.
    """

    def __init__(self, num_particles: int = 1) -> None:
        super().__init__(num_particles=num_particles)

    def _get_trace(self, model, guide, args, kwargs):
        """One (model trace, guide trace) pair, as ``Trace_ELBO`` draws it (for ELBO helpers)."""
        return get_importance_trace("flat", self.max_plate_nesting, model, guide, args, kwargs)

    def elbo_terms(self, model, guide, *args, **kwargs) -> tuple[Tensor, Tensor]:
        """Per-particle ELBO contributions (num_particles,) and the component weights.

        Returns ``(values, log_w)``: the mean of ``values`` is the differentiable ELBO
        estimate; ``log_w`` (num_particles, K) are the classifier's log-weights at each z.
        """
        if not isinstance(guide, AutoCWM):
            raise TypeError(
                f"CWMELBO needs an AutoCWM guide, got {type(guide).__name__}; use Trace_ELBO "
                "for other guides"
            )
        if guide.prototype_trace is None:
            with poutine.block():
                guide(*args, **kwargs)
        posterior = guide.get_posterior(*args, **kwargs)
        images, log_w = posterior.rsample_components((self.num_particles,))
        p, k, d = images.shape
        log_q = posterior.log_prob(images)
        log_p = unconstrained_log_joint(model, guide, images.reshape(p * k, d), *args, **kwargs)
        values = (log_w.exp() * (log_p.reshape(p, k) - log_q)).sum(-1)
        return values, log_w

    def differentiable_loss(self, model, guide, *args, **kwargs) -> Tensor:
        """The negative ELBO estimate, differentiable in the guide's and model's parameters."""
        values, _ = self.elbo_terms(model, guide, *args, **kwargs)
        return -values.mean()

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return self.differentiable_loss(model, guide, *args, **kwargs).item()

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        loss.backward()
        return loss.item()
