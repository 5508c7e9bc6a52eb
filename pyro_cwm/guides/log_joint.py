"""The model's log joint density at packed unconstrained latent vectors, many at once."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.transforms import biject_to
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide.initialization import InitMessenger, init_to_feasible
from pyro.ops import packed as packed_ops
from pyro.ops.contract import contract_to_tensor
from torch import Tensor


def init_without_sampling(site: dict | None = None, radius: float = 0.0):
    """A feasible value of a latent site, found without sampling its distribution.

    The unconstrained value is uniform in (-radius, radius) (``radius=0``: zero), mapped
    into the support. It serves improper priors (``ImproperUniform``), which cannot be
    sampled, and is used where a sampling initialization raises ``NotImplementedError``.
    """
    if site is None:
        return lambda site: init_without_sampling(site, radius)
    fn = site["fn"]
    transform = biject_to(fn.support)
    shape = transform.inverse_shape(fn.shape())
    unconstrained = torch.rand(shape) * 2 * radius - radius
    return transform(unconstrained)


def with_improper_fallback(init_fn, radius: float = 0.0):
    """``init_fn``, falling back to ``init_without_sampling(site, radius)`` where it raises
    ``NotImplementedError`` (a distribution that cannot be sampled)."""

    def init(site):
        try:
            return init_fn(site)
        except NotImplementedError:
            pass
        try:
            return init_without_sampling(site, radius)
        except NotImplementedError:  # no bijection either: AutoCWM's check names the site
            return site["fn"].sample().detach()

    return init


def is_enumerated(site: dict) -> bool:
    """A latent sample site marked for parallel enumeration (``config_enumerate``): an ELBO
    sums it out, so no guide covers it."""
    return (
        site["type"] == "sample"
        and not site["is_observed"]
        and site["infer"].get("enumerate") == "parallel"
    )


def enumerated_sites(model, *args, **kwargs) -> list[str]:
    """Names of the sites of ``model(*args, **kwargs)`` that are marked for parallel
    enumeration (see ``is_enumerated``)."""
    trace = structure_trace(model, *args, **kwargs)
    return [name for name, site in trace.nodes.items() if is_enumerated(site)]


def structure_trace(model, *args, **kwargs):
    """One trace of ``model`` for its structure: latent sites at feasible values, so that
    models with improper priors (which cannot be sampled) can be traced too."""
    continuous = with_improper_fallback(init_to_feasible)

    def init(site):
        try:
            discrete = site["fn"].support.is_discrete
        except NotImplementedError:  # a support that cannot say: drawn, and AutoCWM names it
            discrete = True
        return site["fn"].sample().detach() if discrete else continuous(site)

    model = InitMessenger(init)(model)
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
    approximates (up to the evidence). Discrete sites marked for parallel enumeration
    (``config_enumerate``) are summed out exactly, as ``TraceEnum_ELBO`` sums them.
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
        conditioned = poutine.condition(model, data=values)
        enumerated = poutine.enum(conditioned, first_available_dim=-(nesting + 2))
        trace = poutine.trace(enumerated).get_trace(*args, **kwargs)
    trace.compute_log_prob()
    return log_det + sum_out_enumerated(trace, num, nesting, "_cwm_particles")


def sum_out_enumerated(trace, num: int, nesting: int, particles: str) -> Tensor:
    """The trace's log density per particle (num,), enumerated discrete sites summed out.

    Without enumerated sites this is the plain sum of the sites' log densities. With them
    (``config_enumerate``), the terms that depend on an enumerated value are contracted as
    ``TraceEnum_ELBO`` contracts them (sum over the values, product over plates); their
    mask goes inside and the subsampling scale outside the log of the sum.
    """
    sites = [site for site in trace.nodes.values() if site["type"] == "sample"]
    enumerated = [site for site in sites if site["infer"].get("_enumerate_dim") is not None]
    if not enumerated:
        terms = [per_particle(site["log_prob"], num, nesting) for site in sites]
        return sum(terms[1:], terms[0]) if terms else torch.zeros(num)
    trace.pack_tensors()
    plate_symbols = set(trace.plate_to_symbol.values())
    enum_dims = set().union(*(site["packed"]["log_prob"]._pyro_dims for site in enumerated))
    enum_dims -= plate_symbols
    total, factors, scales = 0.0, OrderedDict(), set()
    symbol = trace.plate_to_symbol
    for site in sites:
        ordinal = frozenset(symbol[f.name] for f in site["cond_indep_stack"] if f.vectorized)
        packed = site["packed"]
        is_enumerated = site["infer"].get("_enumerate_dim") is not None
        if is_enumerated or not enum_dims.isdisjoint(packed["log_prob"]._pyro_dims):
            factor = packed_ops.scale_and_mask(packed["unscaled_log_prob"], mask=packed["mask"])
            factors.setdefault(ordinal, []).append(factor)
            scales.add(float(site["scale"]))
        else:
            total = total + per_particle(site["log_prob"], num, nesting)
    if len(scales) > 1:
        raise ValueError(
            "the sites that depend on an enumerated site have different subsampling scales "
            f"{sorted(scales)}: put them in the same subsampled plates"
        )
    # A particle plate of size one is packed away: then the result has no particle dim.
    used = set().union(*(f._pyro_dims for terms in factors.values() for f in terms))
    target = frozenset({symbol[particles]}) & frozenset(used)
    marginal = contract_to_tensor(factors, enum_dims, target_ordinal=target)
    marginal = marginal.reshape(-1).expand(num) if marginal.numel() == 1 else marginal
    return total + scales.pop() * marginal.reshape(num)


def rowwise(log_joint: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """``log_joint`` (n, d) -> (n,) that gives -inf at the rows where the model raises.

    A model can raise at some parameter values only (a covariance matrix that is not
    positive definite at a GP amplitude far out), and then raises for the whole batch it
    runs on. Where the batch raises, its halves are evaluated, down to single rows; a row
    that raises alone gets -inf, the others their values (differentiable as before). The
    first error is raised again where every row raises alone (the model fails everywhere)
    and where none does (the model fails only on batches: it does not vectorize).
    """

    def evaluate(u: Tensor, errors: list, batch_errors: list) -> Tensor:
        try:
            return log_joint(u)
        except (RuntimeError, ValueError) as error:
            if u.shape[0] == 1:
                errors.append(error)
                return torch.full((1,), -math.inf, dtype=u.dtype, device=u.device)
            batch_errors.append(error)
            half = (u.shape[0] + 1) // 2
            return torch.cat(
                [evaluate(u[:half], errors, batch_errors), evaluate(u[half:], errors, batch_errors)]
            )

    def safe(u: Tensor) -> Tensor:
        errors: list = []  # one per row that raised alone
        batch_errors: list = []
        value = evaluate(u, errors, batch_errors)
        if errors and len(errors) == u.shape[0]:
            raise errors[0]
        if batch_errors and not errors:
            # Every row runs alone but not together: the model does not vectorize, which
            # is no property of the points.
            raise batch_errors[0]
        return value

    return safe
