"""Importance-sampling diagnostics of a guide: PSIS k-hat, IS log-evidence and the ELBO."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import pyro.poutine as poutine
import torch
from pyro.ops.stats import fit_generalized_pareto
from torch import Tensor

from pyro_cwm.guides.autocwm import AutoCWM
from pyro_cwm.guides.log_joint import (
    max_plate_nesting,
    per_particle,
    sum_out_enumerated,
    unconstrained_log_joint,
)


@dataclass
class PSISDiagnostic:
    """What [`psis_diagnostic`][inference.psis_diagnostic] returns.

    Attributes:
        k_hat: Pareto shape of the largest importance weights (Yao et al., 2018):
            below 0.5 good, below 0.7 usable, above 0.7 unreliable.
        log_z: importance-sampling estimate of the log-evidence log p(data).
        elbo: the mean log weight, E_q[log p - log q] (a lower bound on ``log_z``).
        log_weights: the log weights log p(data, z_s) - log q(z_s), shape (num_samples,).

    A guide that misses a mode can still show a small k-hat: compare ``log_z`` with the
    truth, or with another method, and ``elbo`` with ``log_z``.
    """

    k_hat: float
    log_z: float
    elbo: float
    log_weights: Tensor


def log_importance_weights(model, guide, *args, num_samples: int = 1000, **kwargs) -> Tensor:
    """``log p(data, z_s) - log q(z_s)`` for ``num_samples`` guide draws: shape (num_samples,).

    The draws run as one vectorized call of the guide and of the model (a particle plate
    left of the model's plates). Works for any guide whose sites broadcast over a plate
    (Pyro's autoguides). An [`AutoCWM`][pyro_cwm.guides.AutoCWM] draws from its posterior
    directly and runs the model as [`CWMELBO`][inference.CWMELBO] does (point by point
    where the model does not broadcast).
    """
    if isinstance(guide, AutoCWM):
        return _autocwm_log_weights(model, guide, num_samples, args, kwargs)
    nesting = max_plate_nesting(model, *args, **kwargs)
    with torch.no_grad(), pyro.plate("_psis_particles", num_samples, dim=-(nesting + 1)):
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        # Discrete sites marked for enumeration are summed out of the model's density.
        replayed = poutine.enum(
            poutine.replay(model, trace=guide_trace), first_available_dim=-(nesting + 2)
        )
        model_trace = poutine.trace(replayed).get_trace(*args, **kwargs)
        model_trace.compute_log_prob()
        total = sum_out_enumerated(model_trace, num_samples, nesting, "_psis_particles")
        guide_trace.compute_log_prob()
        for site in guide_trace.nodes.values():
            if site["type"] == "sample":
                total = total.to(site["log_prob"]) - per_particle(
                    site["log_prob"], num_samples, nesting
                )
    return total


def _autocwm_log_weights(model, guide, num_samples: int, args: tuple, kwargs: dict) -> Tensor:
    """``log p(data, u) - log q(u)`` at ``num_samples`` draws u of an AutoCWM's unconstrained
    posterior, the model run as CWMELBO runs it (``unconstrained_log_joint``: batched, or
    point by point for a model that does not broadcast)."""
    with torch.no_grad():
        if guide.prototype_trace is None:
            with poutine.block():
                guide(*args, **kwargs)
        posterior = guide.get_posterior(*args, **kwargs)
        latent = posterior.sample((num_samples,))
        log_p = unconstrained_log_joint(model, guide, latent, *args, **kwargs)
        return log_p - posterior.log_prob(latent)


def psis_diagnostic(
    model, guide, *args, num_samples: int = 1000, seed: int | None = 0, **kwargs
) -> PSISDiagnostic:
    """Pareto-smoothed importance-sampling diagnostic of ``guide`` for ``model(*args)``.

    Fits a generalized Pareto to the largest 20% of the weights (at most 3 sqrt(S)
    of them, as in Vehtari et al.) with Pyro's ``fit_generalized_pareto``.

    Raises:
        ValueError: if ``num_samples`` < 10.
    """
    if num_samples < 10:
        raise ValueError(f"num_samples must be >= 10, got {num_samples}")
    state = torch.random.get_rng_state()
    if seed is not None:
        torch.manual_seed(seed)
    try:
        log_w = log_importance_weights(model, guide, *args, num_samples=num_samples, **kwargs)
    finally:
        if seed is not None:
            torch.random.set_rng_state(state)
    finite = log_w[torch.isfinite(log_w)]
    log_z = (torch.logsumexp(finite, 0) - math.log(num_samples)).item()
    tail = int(min(0.2 * num_samples, 3 * math.sqrt(num_samples)))
    largest = torch.topk(finite, tail + 1).values
    ratios = (largest.double() - largest[0]).exp()  # weights over the largest one
    excess = ratios[:-1] - ratios[-1]
    try:
        k_hat = float(fit_generalized_pareto(excess)[0])
    except ZeroDivisionError:
        k_hat = math.nan
    if not math.isfinite(k_hat):
        # The largest weight dwarfs the rest (the others underflow): as bad as it gets.
        k_hat = math.inf
    return PSISDiagnostic(k_hat, log_z, finite.mean().item(), log_w)
