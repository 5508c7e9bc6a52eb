"""The model's log joint density at packed unconstrained latent vectors, many at once."""

from __future__ import annotations

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.transforms import biject_to
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide.initialization import InitMessenger, init_to_feasible
from torch import Tensor


def structure_trace(model, *args, **kwargs):
    """One trace of ``model`` for its structure: latent sites at feasible values, so that
    models with improper priors (which cannot be sampled) can be traced too."""
    model = InitMessenger(init_to_feasible)(model)
    return poutine.block(poutine.trace(model).get_trace)(*args, **kwargs)


def max_plate_nesting(model, *args, **kwargs) -> int:
    """How many plate dimensions ``model(*args, **kwargs)`` uses (observed sites included)."""
    trace = structure_trace(model, *args, **kwargs)
    return max(
        (
            -frame.dim
            for site in trace.nodes.values()
            if site["type"] == "sample"
            for frame in site["cond_indep_stack"]
            if frame.vectorized
        ),
        default=0,
    )


def per_particle(x, num: int, nesting: int) -> Tensor:
    """Reduce a log-density term of shape (..., [num], *plates) to shape (num,)."""
    if not torch.is_tensor(x):
        return torch.tensor(float(x)).expand(num)
    if x.dim() > nesting:
        x = x.sum(dim=tuple(range(x.dim() - nesting, x.dim()))) if nesting else x
        return x.reshape(-1).expand(num) if x.numel() == 1 else x.reshape(num)
    return x.sum().expand(num)


def unconstrained_log_joint(model, guide, latent: Tensor, *args, **kwargs) -> Tensor:
    """``log p(data, u)`` of ``model`` at unconstrained latent vectors ``u``, shape (N,).

    ``latent`` has shape (N, latent_dim) in the packing of ``guide``, an AutoContinuous
    that has been set up and has a ``max_plate_nesting`` attribute (as AutoCWM has). The
    N points are evaluated in one run of the model under a particle plate left of the
    model's plates. The log-Jacobian of the maps from ``u`` to the constrained sites is
    included, so this is the density that the guide's unconstrained distribution
    approximates (up to the evidence).
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
        log_det = log_det + per_particle(ladj, num, nesting)
        values[site["name"]] = value
    with pyro.plate("_cwm_particles", num, dim=-(nesting + 1)):
        trace = poutine.trace(poutine.condition(model, data=values)).get_trace(*args, **kwargs)
    trace.compute_log_prob()
    log_p = log_det
    for site in trace.nodes.values():
        if site["type"] == "sample":
            log_p = log_p + per_particle(site["log_prob"], num, nesting)
    return log_p
