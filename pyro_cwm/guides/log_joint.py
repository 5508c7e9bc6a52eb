"""The model's log joint density at packed unconstrained latent vectors, many at once."""

from __future__ import annotations

import functools
import math
import warnings
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.transforms import biject_to
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide.initialization import InitMessenger, init_to_feasible
from pyro.ops import packed as packed_ops
from pyro.ops.contract import contract_to_tensor
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
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
    models with improper priors (which cannot be sampled) can be traced too. Where the
    model raises, the error names it and the last sample site it reached."""
    continuous = with_improper_fallback(init_to_feasible)

    def init(site):
        try:
            discrete = site["fn"].support.is_discrete
        except NotImplementedError:  # a support that cannot say: drawn, and AutoCWM names it
            discrete = True
        return site["fn"].sample().detach() if discrete else continuous(site)

    last = _LastSite()
    traced = poutine.trace(last(InitMessenger(init)(model)))
    try:
        return poutine.block(traced.get_trace)(*args, **kwargs)
    except MODEL_ERRORS as error:
        how = "once at a feasible point of its latent sites (to learn its structure)"
        raise _model_error(error, model, last.name, how) from error


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


VECTORIZED, VMAP, LOOP = "vectorized", "vmap", "loop"
"""The routes of ``unconstrained_log_joint``: one batched run of the model, the model run
at one point under ``torch.func.vmap``, or one run per point."""
MODEL_ERRORS = (RuntimeError, ValueError, IndexError, TypeError)
"""What a model raises where it does not broadcast over extra leading dimensions."""

VECTORIZE_HINT = (
    "To let it run as one batched call, write it so that every latent value may carry "
    "extra dimensions on the left: X @ w as (X * w).sum(-1) inside a data plate "
    "(torch.mv and .dot likewise), w[..., i] rather than w[i], .sum(-1) rather than "
    ".sum(); put the data points in a pyro.plate (not a "
    "Python loop, not .expand([N])), and write pyro.markov chains with the same "
    "broadcasting arithmetic"
)


def unconstrained_log_joint(model, guide, latent: Tensor, *args, **kwargs) -> Tensor:
    """``log p(data, u)`` of ``model`` at unconstrained latent vectors ``u``, shape (N,).

    ``latent`` has shape (N, latent_dim) in the packing of ``guide``, an AutoContinuous
    that has been set up and has a ``max_plate_nesting`` attribute (as AutoCWM has). The
    log-Jacobian of the maps from ``u`` to the constrained sites is included, so this is
    the density that the guide's unconstrained distribution approximates (up to the
    evidence). Discrete sites marked for parallel enumeration (``config_enumerate``) are
    summed out exactly, as ``TraceEnum_ELBO`` sums them.

    The N points run as one call of the model under a particle plate left of its plates
    (the latent values get an extra leading dimension). The first call checks that the
    model broadcasts over it: the batched values must agree with the model run at the
    first and last point alone. A model that raises, returns the wrong shape or
    broadcasts wrongly (``X @ w``, ``torch.mv``, ``.dot``) then runs at one point under
    ``torch.func.vmap`` where that agrees too, else point by point (correct, slower),
    every point from the same random state; one warning says how to vectorize it. The
    route is kept per guide and model (``log_joint_route``).

    Raises:
        RuntimeError: (or the model's ValueError, TypeError, IndexError) where the model
            raises even at a single point, naming the model and the last sample site it
            reached (the model's own error chained).
    """
    routes = vars(guide).setdefault("_log_joint_routes", {})
    route = routes.get(_model_key(model))
    if route == LOOP:
        return _looped(model, guide, latent, args, kwargs)
    state = _rng_state(latent)
    try:
        run = _vmapped if route == VMAP else _vectorized
        value, error = run(model, guide, latent, args, kwargs), None
    except MODEL_ERRORS as caught:
        value, error = None, caught
    if route is not None and error is None:
        return value
    return _decide(model, guide, latent, args, kwargs, (route or VECTORIZED, value, error), state)


def log_joint_route(guide: Any, model: Callable | None = None) -> str | None:
    """How [`unconstrained_log_joint`][inference.unconstrained_log_joint] runs ``model``
    (default: the guide's own) for ``guide``: ``"vectorized"`` (one batched call),
    ``"vmap"`` (one point under ``torch.func.vmap``), ``"loop"`` (point by point) or None
    (not decided yet)."""
    model = getattr(guide, "_raw_model", None) if model is None else model
    return vars(guide).get("_log_joint_routes", {}).get(_model_key(model))


def _model_key(model):
    try:
        hash(model)
    except TypeError:
        return id(model)
    return model


def model_name(model) -> str:
    """The model's name, quoted, through Pyro's handlers and partials (for messages)."""
    inner = model
    for _ in range(20):  # through Pyro's handlers (poutine.block(model), ...)
        name = getattr(inner, "__qualname__", None) or getattr(inner, "__name__", None)
        if isinstance(name, str):
            return repr(name)
        wrapped = getattr(inner, "__wrapped__", None)
        if wrapped is None and isinstance(inner, functools.partial):
            wrapped = inner.args[-1] if inner.args and callable(inner.args[-1]) else inner.func
        if wrapped is None:
            break
        inner = wrapped
    return f"of type {type(model).__name__}"


def _rng_state(latent: Tensor):
    cuda = torch.cuda.get_rng_state(latent.device) if latent.is_cuda else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state, latent: Tensor) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], latent.device)


class _LastSite(Messenger):
    """Remembers the last sample site that the model reached (for error messages)."""

    def __init__(self) -> None:
        super().__init__()
        self.name: str | None = None

    def _pyro_post_sample(self, msg) -> None:
        if not site_is_subsample(msg):
            self.name = msg["name"]


class _WrongShape(RuntimeError):
    """The model ran, but its log densities do not reduce to one value per point."""


def _model_error(error: Exception, model, site: str | None, how: str) -> Exception:
    """A clear error of the same kind (ValueError, TypeError, IndexError or RuntimeError)
    naming the model, how it was run and the last sample site it reached."""
    kinds = (ValueError, TypeError, IndexError)
    kind = next((kind for kind in kinds if isinstance(error, kind)), RuntimeError)
    where = "before its first sample site"
    if site is not None:
        where = f"after its sample site {site!r} (the last one it reached)"
    return kind(
        f"the model {model_name(model)} raised {type(error).__name__} when run {how}, "
        f"{where}: {error}"
    )


def _vectorized(model, guide, latent: Tensor, args: tuple, kwargs: dict) -> Tensor:
    """All points in one run of the model under a particle plate left of its plates."""
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
    try:
        trace.compute_log_prob()
        value = log_det + sum_out_enumerated(trace, num, nesting, "_cwm_particles")
    except RuntimeError as error:  # log densities of the wrong shape
        raise _WrongShape(str(error)) from error
    if value.shape != (num,):
        raise _WrongShape(f"its log density has shape {tuple(value.shape)}, not ({num},)")
    return value


def _point_trace(model, guide, u: Tensor, args: tuple, kwargs: dict, enum: bool = True):
    """The model's trace at one point u (latent_dim,), run on its own as any Pyro
    inference runs it, its log densities computed, and the log-Jacobian (a scalar)."""
    values = {}
    log_det = u.new_zeros(())
    for site, unconstrained in guide._unpack_latent(u):
        transform = biject_to(site["fn"].support)
        value = transform(unconstrained)
        log_det = log_det + transform.log_abs_det_jacobian(unconstrained, value).sum()
        values[site["name"]] = value
    fn = poutine.condition(model, data=values)
    if enum:
        fn = poutine.enum(fn, first_available_dim=-(guide.max_plate_nesting + 1))
    last = _LastSite()
    try:
        with last:
            trace = poutine.trace(fn).get_trace(*args, **kwargs)
        trace.compute_log_prob()
    except MODEL_ERRORS as error:
        raise _model_error(error, model, last.name, "at one latent point alone") from error
    return trace, log_det


def _at_point(model, guide, u: Tensor, args: tuple, kwargs: dict) -> tuple[Tensor, float, bool]:
    """The log joint at one point u, a rounding tolerance for it (from the size of its
    terms), and whether the model has enumerated sites."""
    trace, log_det = _point_trace(model, guide, u, args, kwargs)
    total = log_det + sum_out_enumerated(trace, 1, None, None)[0]
    sites = [site for site in trace.nodes.values() if site["type"] == "sample"]
    size = float(log_det.abs()) + sum(
        float(site["log_prob"].detach().abs().nan_to_num(0.0, 0.0, 0.0).sum()) for site in sites
    )
    enumerates = any(site["infer"].get("_enumerate_dim") is not None for site in sites)
    return total, 1e3 * torch.finfo(u.dtype).eps * (1.0 + size), enumerates


def _vmapped(model, guide, latent: Tensor, args: tuple, kwargs: dict) -> Tensor:
    """The model run at one point under ``torch.func.vmap`` over the points (no enumerated
    sites; validation off, as it branches on tensor values)."""

    def at_point(u: Tensor) -> Tensor:
        trace, log_det = _point_trace(model, guide, u, args, kwargs, enum=False)
        return log_det + sum_out_enumerated(trace, 1, None, None)[0]

    with pyro.validation_enabled(False), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop")
        return torch.func.vmap(at_point, randomness="same")(latent)


def _looped(model, guide, latent: Tensor, args: tuple, kwargs: dict, state=None) -> Tensor:
    """The points one at a time, each from the same random state (as one batched run
    draws a subsampled plate's indices once for all points)."""
    if latent.shape[0] == 0:
        return latent.new_zeros(0)
    state = _rng_state(latent) if state is None else state
    values = []
    for u in latent:
        _set_rng_state(state, latent)
        values.append(_at_point(model, guide, u, args, kwargs)[0])
    return torch.stack(values)


def _agrees(value: Tensor, reference: tuple) -> bool:
    ref, tol = reference[:2]
    if not torch.isfinite(ref):
        return bool(value == ref) or bool(value.isnan() & ref.isnan())
    return bool((value.detach() - ref).abs() <= tol)


def _decide(model, guide, latent, args, kwargs, tried: tuple, state) -> Tensor:
    """Check the batched routes against the model run at single points and keep the first
    that agrees (see ``unconstrained_log_joint``); ``tried``: ``(route, value, error)`` of
    the call already made from the random ``state``."""
    routes, key = vars(guide)["_log_joint_routes"], _model_key(model)
    after = _rng_state(latent)
    num = latent.shape[0]
    references, point_errors = {}, []
    with torch.no_grad():
        for index in sorted({0, num - 1}):
            _set_rng_state(state, latent)
            try:
                references[index] = _at_point(model, guide, latent[index], args, kwargs)
            except MODEL_ERRORS as point_error:
                point_errors.append(point_error)
    _set_rng_state(after, latent)
    if not references:
        if tried[2] is None:
            return tried[1]  # undecided: the points fail alone, not batched
        raise point_errors[0]
    candidates = [VECTORIZED]
    if not any(ref[2] for ref in references.values()):
        candidates.append(VMAP)  # vmap cannot run Pyro's enumeration
    reason = None
    for route in candidates:
        run = _vmapped if route == VMAP else _vectorized
        if route == tried[0]:
            value, error = tried[1:]
        else:
            _set_rng_state(state, latent)
            try:
                value, error = run(model, guide, latent, args, kwargs), None
            except MODEL_ERRORS as caught:
                value, error = None, caught
            _set_rng_state(after, latent)
        if error is None and all(_agrees(value[i], ref) for i, ref in references.items()):
            routes[key] = route
            if route != VECTORIZED:
                _warn(model, reason, "runs at one point under torch.func.vmap")
            return value
        if error is None:
            failure = "its values at several points at once differ from those at each point"
            failure += " alone (it broadcasts wrongly)"
        elif isinstance(error, _WrongShape):
            failure = f"its log densities do not reduce to one per point ({error})"
        else:
            # Raised at these points' values, or because it cannot batch at all?
            indices = (list(references) * 2)[:2]
            _set_rng_state(state, latent)
            try:
                with torch.no_grad():
                    check = run(model, guide, latent[indices], args, kwargs)
                batches = all(_agrees(v, references[i]) for v, i in zip(check, indices))
            except MODEL_ERRORS:
                batches = False
            _set_rng_state(after, latent)
            if batches:
                routes[key] = route
                how = f"at {num} latent points in one {route} call"
                raise _model_error(error, model, None, how) from error
            failure = f"it raised {type(error).__name__}: {str(error).splitlines()[0]}"
        reason = reason or failure
    routes[key] = LOOP
    _warn(model, reason, "runs at one point at a time: correct, but slower")
    return _looped(model, guide, latent, args, kwargs, state)


def _warn(model, reason: str, how: str) -> None:
    warnings.warn(
        f"AutoCWM: the model {model_name(model)} does not broadcast over extra leading "
        f"batch dimensions ({reason}). At AutoCWM's component images, particles and start "
        f"points it now {how}; TraceEnum_ELBO, which runs all K images in one call, cannot "
        f"train AutoCWM on it: use CWMELBO. {VECTORIZE_HINT}.",
        stacklevel=4,
    )


def sum_out_enumerated(trace, num: int, nesting: int | None, particles: str | None) -> Tensor:
    """The trace's log density per particle (num,), enumerated discrete sites summed out.

    ``nesting=None``: a trace with no particle plate (``num=1``), every term summed.

    Without enumerated sites this is the plain sum of the sites' log densities. With them
    (``config_enumerate``), the terms that depend on an enumerated value are contracted as
    ``TraceEnum_ELBO`` contracts them (sum over the values, product over plates); their
    mask goes inside and the subsampling scale outside the log of the sum.
    """
    sites = [site for site in trace.nodes.values() if site["type"] == "sample"]
    enumerated = [site for site in sites if site["infer"].get("_enumerate_dim") is not None]

    def reduce(x) -> Tensor:
        if nesting is not None:
            return per_particle(x, num, nesting)
        return (x.sum() if torch.is_tensor(x) else torch.tensor(float(x))).reshape(1)

    if not enumerated:
        terms = [reduce(site["log_prob"]) for site in sites]
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
            total = total + reduce(site["log_prob"])
    if len(scales) > 1:
        raise ValueError(
            "the sites that depend on an enumerated site have different subsampling scales "
            f"{sorted(scales)}: put them in the same subsampled plates"
        )
    # A particle plate of size one is packed away: then the result has no particle dim.
    used = set().union(*(f._pyro_dims for terms in factors.values() for f in terms))
    target = (
        frozenset({symbol[particles]}) & frozenset(used) if particles in symbol else frozenset()
    )
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
