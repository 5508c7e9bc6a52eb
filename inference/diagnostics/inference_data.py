"""Conversion of fitted guides and MCMC runs to ArviZ InferenceData.

All contact with ArviZ's constructors is in ``_build``: supporting ArviZ 1.x
(DataTree, nested ``from_dict``) means changing that function alone.
"""

from __future__ import annotations

import math

import arviz as az
import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import MCMC, Predictive
from pyro.poutine.util import site_is_subsample

from pyro_cwm.guides.log_joint import is_enumerated, max_plate_nesting, structure_trace


def _build(posterior, posterior_predictive, log_likelihood, observed_data) -> az.InferenceData:
    """The one place that calls ArviZ: dicts of numpy arrays (chain, draw, ...) to groups."""
    return az.from_dict(
        posterior=posterior,
        posterior_predictive=posterior_predictive or None,
        log_likelihood=log_likelihood or None,
        observed_data=observed_data or None,
    )


def _sites(model, *args, **kwargs):
    """Latent and observed sites of the model; enumerated sites (summed out, never drawn
    from the posterior) are in neither."""
    trace = structure_trace(model, *args, **kwargs)
    latent, observed = {}, {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site) or site["infer"].get("is_auxiliary"):
            continue
        if is_enumerated(site):
            continue
        (observed if site["is_observed"] else latent)[name] = site
    return latent, observed


def to_inference_data(
    model,
    guide=None,
    *args,
    num_samples: int = 1000,
    num_chains: int = 4,
    seed: int | None = 0,
    **kwargs,
) -> az.InferenceData:
    """An ArviZ InferenceData of a fitted guide (or of a Pyro ``MCMC`` run).

    Groups: ``posterior`` (constrained values of every latent site, shaped
    ``(chain, draw, *site_shape)``: a scalar site has no trailing dimension),
    ``posterior_predictive`` (draws of the observed sites), ``log_likelihood`` (the
    pointwise log-likelihood of every observation, for ``az.loo``) and ``observed_data``.
    The ``num_samples`` guide draws are split into ``num_chains`` pseudo-chains so that
    ESS and R-hat are defined (independent draws: R-hat near 1).

    Args:
        model (Callable | pyro.infer.MCMC): the Pyro model, or a finished
            ``pyro.infer.MCMC`` run (then ``guide`` and the model arguments are not
            needed: ArviZ's ``from_pyro`` converts it).
        guide (Callable | None): the fitted guide.
        num_samples: number of guide draws (a multiple of ``num_chains`` is used).
        seed: seed of the draws (None: the global RNG as it is).

    Raises:
        ValueError: if no guide is given for a model, or ``num_samples < num_chains``.
    """
    if isinstance(model, MCMC):
        return az.from_pyro(model, log_likelihood=True)
    if guide is None:
        raise ValueError("guide is required unless model is a pyro.infer.MCMC run")
    if num_samples < num_chains or num_chains < 1:
        raise ValueError(f"num_samples ({num_samples}) must be >= num_chains ({num_chains}) >= 1")
    draws = num_samples // num_chains
    total = draws * num_chains
    latent, observed = _sites(model, *args, **kwargs)
    state = torch.random.get_rng_state()
    if seed is not None:
        pyro.set_rng_seed(seed)
    nesting = max_plate_nesting(model, *args, **kwargs)
    try:
        with torch.no_grad():
            # The guide's draws as the model broadcasts them (a draw plate left of the
            # model's plates): Predictive's own reshaping of guide draws drops the size-1
            # dims of a vector site outside every plate (e.g. ``.expand([K]).to_event(1)``).
            with pyro.plate("_draws", total, dim=-(nesting + 1)):
                guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
            guide_draws = {
                n: _as_draws(guide_trace.nodes[n]["value"], site, total, nesting)
                for n, site in latent.items()
                if n in guide_trace.nodes
            }
            samples = Predictive(
                model,
                posterior_samples=guide_draws,
                num_samples=total,
                parallel=True,
                return_sites=list(latent) + list(observed),
            )(*args, **kwargs)
            log_lik = _pointwise_log_likelihood(
                model, samples, latent, observed, total, *args, **kwargs
            )
    finally:
        if seed is not None:
            torch.random.set_rng_state(state)

    def shaped(value, site_shape):
        return value.detach().cpu().reshape((num_chains, draws) + tuple(site_shape)).numpy()

    posterior = {n: shaped(samples[n], s["value"].shape) for n, s in latent.items()}
    predictive = {n: shaped(samples[n], s["value"].shape) for n, s in observed.items()}
    observed_data = {n: s["value"].detach().cpu().numpy() for n, s in observed.items()}
    log_likelihood = {n: shaped(v, v.shape[1:]) for n, v in log_lik.items()}
    return _build(posterior, predictive, log_likelihood, observed_data)


def _as_draws(value, site, total: int, nesting: int):
    """A guide's ``total`` draws of a model site, shaped as the model broadcasts them under a
    draw plate left of its ``nesting`` plates: (total, 1, ..., *batch_shape, *event_shape)."""
    site_shape = tuple(site["value"].shape)
    if value.numel() != total * math.prod(site_shape):  # the same value for every draw
        value = value.expand((total,) + site_shape)
    batch_shape = tuple(site["fn"].batch_shape)
    event_shape = tuple(site["fn"].event_shape)
    shape = (total,) + (1,) * (nesting - len(batch_shape)) + batch_shape + event_shape
    return value.reshape(shape)


def _pointwise_log_likelihood(model, samples, latent, observed, total, *args, **kwargs):
    """log p(y_i | theta_s) per draw and observation: {site: (total, *batch_shape)}.

    Enumerated sites (a mixture's assignments) are summed out of each observation's term:
    log p(y_i | theta) = log sum_z p(z | theta) p(y_i | z, theta), with the enumerated sites
    whose values the observation's log density depends on."""
    nesting = max_plate_nesting(model, *args, **kwargs)
    values = {name: samples[name] for name in latent}
    conditioned = poutine.enum(
        poutine.condition(model, data=values), first_available_dim=-(nesting + 2)
    )
    with pyro.plate("_draws", total, dim=-(nesting + 1)):
        trace = poutine.trace(conditioned).get_trace(*args, **kwargs)
    enumerated = [
        node["fn"].log_prob(node["value"])
        for node in trace.nodes.values()
        if node["type"] == "sample" and node["infer"].get("_enumerate_dim") is not None
    ]
    result = {}
    for name, site in observed.items():
        node = trace.nodes[name]
        log_p = node["fn"].log_prob(node["value"])
        if log_p.dim() > nesting + 1:  # enumeration dims left of the draws: sum them out
            for term in enumerated:
                if term.dim() > nesting + 1 and _shares_enum_dim(term, log_p, nesting):
                    log_p = log_p + term
            log_p = log_p.logsumexp(tuple(range(log_p.dim() - nesting - 1)))
        batch_shape = tuple(site["fn"].batch_shape)
        full = (total,) + (1,) * (nesting - len(batch_shape)) + batch_shape
        log_p = log_p.expand(torch.broadcast_shapes(log_p.shape, full))
        result[name] = log_p.reshape((total,) + batch_shape)
    return result


def _shares_enum_dim(term, log_p, nesting: int) -> bool:
    """Whether ``term`` varies along an enumeration dimension along which ``log_p`` varies."""
    left = min(term.dim(), log_p.dim()) - nesting - 1
    return any(
        term.shape[-nesting - 2 - i] > 1 and log_p.shape[-nesting - 2 - i] > 1 for i in range(left)
    )
