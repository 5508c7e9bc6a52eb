"""Variational approximations against ground truth: AutoCWM, Pyro's autoguides and NUTS.

Targets: analytic densities with exact samplers (normalized, log Z = 0: ring, two moons,
banana, 10-D funnel, 10-D two Gaussians); posteriordb posteriors with reference Stan
draws (eight schools centered, the label-switching Gaussian mixture, kilpisjarvi, arK,
GP Poisson regression, diamonds (26-D, badly conditioned), nes (NES 2000 regression),
hmm_drive_0 (a two-state HMM, states summed out); read from ``--refpost``); and a model
zoo written as users write Pyro models (``pyro_cwm.data.zoo``): ``mixture_enum`` (enumerated
assignments, quadrature reference), ``hierarchical`` (200 groups subsampled 50 at a time,
local latents fitted by an ``AutoGuideList``, conjugate reference for the global mean),
``logistic`` (20,000 points subsampled 1,000 at a time) and ``linreg100`` (100-D conjugate
regression). For each target and method the table gives: ELBO, IS log Z (its error where
log Z is known, and KL(q||p) = log Z - ELBO there), PSIS k-hat, energy distance to the
reference draws (columns standardized by the reference sds), worst standardized error of
marginal means, worst ratio of marginal sds and their range (smallest and largest
sd_q / sd_p), worst relative error of a mode's share (targets with known modes), wall time
and a note.

Where a method does not apply to a model as it is, the bench adapts the method and says
so in the note: a model with local latents in a subsampled plate gets an ``AutoGuideList``
(the method on the global sites, ``AutoLocalNormal`` on the local ones; ``--local
 mean-field``: ``AutoNormal``) and no PSIS (the local
guide covers one subsample only); Pyro's guides see an enumerated model with its discrete
sites hidden and train with ``TraceEnum_ELBO``; NUTS and PSIS run subsampled models on full
data. A method that still raises gives a row of NaNs with the error in the note.

Methods (``--methods``): AutoNormal, AutoMVN, AutoIAFNormal, AutoCWM (location-scale
maps), AutoCWM:affine, AutoCWM:flow (spline flow map), AutoCWM:maf (flow map with an
autoregressive affine flow), NUTS.

Training: every SVI method is fitted as a user fits it, with ``fit_svi``'s defaults (its
optimizer and step schedule, and its loss: ``CWMELBO()`` for AutoCWM, one particle for
location-scale maps and four for richer ones, ``Trace_ELBO`` for the others,
``TraceEnum_ELBO`` where Pyro's guides meet enumerated sites): the bench measures the
product, and a shortfall it shows is fixed in the defaults, not in the bench.
``--no-fit-defaults`` gives the bench's former settings back (Adam at ``--lr`` for
``--lr-hold`` of the steps, then decaying by ``--lr-decay``; AutoCWM with
``--cwm-particles``), with which the README's older tables were taken.

    python -m inference.bench.vi                                   # everything
    python -m inference.bench.vi --targets ring,eight_schools --steps 500
    python -m inference.bench.vi --targets hierarchical --fit-seeds 0,1,2,3  # fit-seed spread
    python -m inference.bench.vi --step-cost                       # AutoCWM vs AutoNormal step
    python -m inference.bench.vi --step-cost --step-cost-targets eight_schools,linreg100 \
        --device cuda                                              # the same on a GPU

NUTS, the reference method, runs the same settings on every target (500 warmup + 1000
draws, one chain, max tree depth 10, a dense mass matrix). It starts at the MAP found by
saddle-free Newton steps (``pyro_cwm.guides.laplace.newton_refine``) and uses the Laplace
covariance there (the inverse negative Hessian in Pyro's unconstrained space) as its
inverse mass matrix, kept fixed; only the step size adapts. Why: with Pyro's default
start (identity) kilpisjarvi (alpha-beta correlation -0.99999, smallest posterior
variance 1e-9 against 8e2) runs its first 100 warmup iterations at the maximum tree
depth, and every adapted estimate is shrunk toward 1e-3 I (Stan's regularization), which
swamps that 1e-9 direction: the adapted run does not finish in 5 minutes, the Laplace
one takes seconds. On gp_pois_regr (centered latent GP) adapting from the Laplace start
gave 265 divergences and a biased sample; the fixed Laplace matrix gives a handful and
matches the reference draws. A fixed mass matrix leaves NUTS exact (it only changes its
efficiency). Where Newton finds no mode with positive curvature (a funnel's neck, the
centered eight schools) NUTS falls back to Pyro's windowed dense adaptation from the
identity. ``--no-nuts-laplace`` and ``--no-nuts-fixed-mass`` give the plain runs back.
A single chain stays in one mode: its mode shares on the ring and on low_dim_gauss_mix
are not a reference.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import MCMC, NUTS, Predictive
from pyro.infer.autoguide import (
    AutoGuideList,
    AutoIAFNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from pyro.infer.mcmc.util import initialize_model
from torch import Tensor

from inference.diagnostics.metrics import energy_distance, marginal_errors
from inference.diagnostics.psis import psis_diagnostic
from inference.svi import fit_svi
from inference.svi.elbo import CWMELBO, cwm_guides
from pyro_cwm.data.posteriordb import POSTERIORS, load_reference_posterior
from pyro_cwm.data.posteriors import EIGHT_SCHOOLS_SIGMA, EIGHT_SCHOOLS_Y, eight_schools
from pyro_cwm.data.targets import TARGETS
from pyro_cwm.data.zoo import ZOO
from pyro_cwm.guides import AutoCWM, AutoLocalNormal
from pyro_cwm.guides.laplace import log_joint_derivatives, newton_refine
from pyro_cwm.guides.log_joint import enumerated_sites
from pyro_cwm.nn import map_arguments

DEFAULT_REFPOST = Path(__file__).resolve().parents[2].parent / "shared" / "refpost"


@dataclass
class Problem:
    """A target for the table: a model, reference draws and how to read samples."""

    name: str
    model: Callable
    args: tuple
    reference: Tensor  # (N, P)
    flatten: Callable[[dict], Tensor]  # site samples -> (N, P)
    sites: list[str]
    log_z: float | None = None
    mode_of: Callable[[Tensor], Tensor] | None = None  # (N, P) -> mode labels (N,)
    mode_weights: Tensor | None = None
    # The model's arguments on full data (NUTS, PSIS) where ``args`` subsample; None: args.
    full_args: tuple | None = None
    # Local latents in a subsampled plate: the global sites (guides become an AutoGuideList
    # of the method on these and AutoNormal on the rest; PSIS does not apply).
    global_sites: list[str] | None = None
    psis_samples: int | None = None  # cap on PSIS draws (memory: full data in one batch)


def analytic_problem(name: str, num: int, seed: int) -> Problem:
    target = TARGETS[name]()
    modes = target.modes
    return Problem(
        name,
        target.model,
        (),
        target.sample(num, torch.Generator().manual_seed(seed)),
        lambda s: s["x"].reshape(s["x"].shape[0], -1),
        ["x"],
        log_z=0.0,
        mode_of=None if modes is None else (lambda x: torch.cdist(x, modes).argmin(-1)),
        mode_weights=None if modes is None else torch.full((modes.shape[0],), 1 / len(modes)),
    )


def _reference_problem(name: str, posterior, **options) -> Problem:
    """A Problem from a posterior with reference draws (posteriordb or the zoo)."""
    sites = sorted({c.partition("[")[0] for c in posterior.columns})
    return Problem(
        name,
        posterior.model,
        posterior.args,
        posterior.draws,
        posterior.flatten,
        sites,
        **options,
    )


def posteriordb_problem(name: str, root: Path) -> Problem:
    posterior = load_reference_posterior(name, root)
    mode_of = mode_weights = None
    if name == "low_dim_gauss_mix":
        i, j = posterior.columns.index("mu[1]"), posterior.columns.index("mu[2]")
        mode_of = lambda x: (x[:, i] > x[:, j]).long()  # noqa: E731
        mode_weights = torch.tensor([0.5, 0.5])
    return _reference_problem(name, posterior, mode_of=mode_of, mode_weights=mode_weights)


def zoo_problem(name: str, seed: int) -> Problem:
    """A target of the model zoo (``pyro_cwm.data.zoo``): reference draws of its compared
    (global) sites, full-data arguments for NUTS and PSIS, the log evidence where known."""
    posterior = ZOO[name](seed=seed)
    mode_of = mode_weights = None
    if name == "mixture_enum":
        mode_of = lambda x: (x[:, 0] > x[:, 1]).long()  # noqa: E731
        mode_weights = torch.tensor([0.5, 0.5])
    return _reference_problem(
        name,
        posterior,
        log_z=posterior.log_z,
        mode_of=mode_of,
        mode_weights=mode_weights,
        full_args=posterior.full_args,
        global_sites=posterior.global_sites,
        psis_samples=500 if name == "logistic" else None,
    )


def make_guide(
    name: str,
    model,
    components: int,
    problem: Problem | None = None,
    cwm_particles: int | None = 4,
    local: str = "conditional",
):
    """The guide of method ``name`` for ``model`` and its loss (None: ``fit_svi``'s default).

    AutoCWM trains with ``CWMELBO(num_particles=cwm_particles)``; ``cwm_particles=None``
    leaves it ``fit_svi``'s default loss (``CWMELBO()``: one particle for location-scale
    maps, four for richer ones).

    With ``problem.global_sites`` (local latents in a subsampled plate) the guide is an
    ``AutoGuideList``: the method on the global sites, then on the local ones
    ``AutoLocalNormal`` (``local="conditional"``) or ``AutoNormal`` (``"mean-field"``).
    With enumerated sites (``config_enumerate``) Pyro's guides see the model with its
    discrete sites hidden (exposing the compared sites, as Pyro's enumeration tutorial
    does), and ``fit_svi``'s default loss for them is ``TraceEnum_ELBO``; AutoCWM takes the
    model as it is (it sums them out itself).
    """
    global_sites = problem.global_sites if problem is not None else None
    enumerated = problem is not None and bool(enumerated_sites(model, *problem.args))
    kind, _, map_name = name.partition(":")
    target = poutine.block(model, expose=global_sites) if global_sites else model
    if enumerated and kind != "AutoCWM":
        target = poutine.block(model, expose=problem.sites)
    if name == "AutoNormal":
        guide, loss = AutoNormal(target), None
    elif name == "AutoMVN":
        guide, loss = AutoMultivariateNormal(target), None
    elif name == "AutoIAFNormal":
        guide, loss = AutoIAFNormal(target, num_transforms=2), None
    elif kind == "AutoCWM":
        guide = AutoCWM(target, num_components=components, **map_arguments(map_name or None))
        loss = None if cwm_particles is None else CWMELBO(num_particles=cwm_particles)
    else:
        raise ValueError(f"unknown method {name!r}")
    if global_sites:
        guides = AutoGuideList(model)
        guides.append(guide)
        local_model = poutine.block(model, hide=global_sites)
        if local == "conditional":
            guides.append(AutoLocalNormal(local_model, given=guide))
        elif local == "mean-field":
            guides.append(AutoNormal(local_model))
        else:
            raise ValueError(f"local must be 'conditional' or 'mean-field', got {local!r}")
        guide = guides
    return guide, loss


def compare(problem: Problem, draws: Tensor) -> dict:
    reference = problem.reference.to(draws.dtype)
    sd = reference.std(0)
    n = min(4000, reference.shape[0], draws.shape[0])
    pick = torch.randperm(reference.shape[0], generator=torch.Generator().manual_seed(0))[:n]
    mean_err, sd_ratio = marginal_errors(draws, reference)
    ratios = draws.std(0) / sd
    row = {
        "energy": energy_distance(draws[:n] / sd, reference[pick] / sd),
        "mean_err": mean_err,
        "sd_ratio": sd_ratio,
        "sd_min": ratios.min().item(),
        "sd_max": ratios.max().item(),
        "mode_err": math.nan,
    }
    if problem.mode_of is not None:
        labels = problem.mode_of(draws)
        shares = torch.bincount(labels, minlength=len(problem.mode_weights)) / labels.shape[0]
        row["mode_err"] = (
            ((shares - problem.mode_weights).abs() / problem.mode_weights).max().item()
        )
    return row


def make_optim(args) -> pyro.optim.PyroOptim:
    """The optimizer of every SVI method under ``--no-fit-defaults``: Adam at ``--lr`` for
    the first ``--lr-hold`` fraction of the steps, then a geometric decay to ``--lr *
    --lr-decay`` at the last step. The constant phase leaves time to travel (a funnel's
    neck to its mouth); the decay removes most of the constant-step noise from the final
    parameters."""
    hold = int(args.lr_hold * args.steps)
    rate = args.lr_decay ** (1.0 / max(1, args.steps - hold))

    def factor(step: int) -> float:
        return 1.0 if step < hold else rate ** (step - hold)

    return pyro.optim.LambdaLR(
        {"optimizer": torch.optim.Adam, "optim_args": {"lr": args.lr}, "lr_lambda": factor}
    )


def failed_row(problem: Problem, method: str, error: Exception) -> dict:
    """A row of NaNs with a note, for a method that raised on a target."""
    row = {"target": problem.name, "method": method, "time_s": math.nan}
    row.update(dict.fromkeys(COLUMNS, math.nan))
    row["note"] = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
    return row


def run_vi(problem: Problem, method: str, args) -> dict:
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    particles = None if args.fit_defaults else args.cwm_particles
    guide, loss = make_guide(
        method, problem.model, args.components, problem, particles, local=args.local
    )
    started = time.perf_counter()
    fit_svi(
        problem.model,
        guide,
        *problem.args,
        num_steps=args.steps,
        loss=loss,
        progress=False,
        optim=None if args.fit_defaults else make_optim(args),
    )
    elapsed = time.perf_counter() - started
    notes = []
    chosen = [g.map_chosen for g in cwm_guides(guide)]
    if method == "AutoCWM" and chosen:
        notes.append(f"map {chosen[0]}")
    if problem.global_sites:
        # The local guide covers only the groups of one subsample: no full-data weights.
        elbo = log_z = k_hat = math.nan
        notes.append(
            f"AutoGuideList ({method} on {','.join(problem.global_sites)}, "
            f"{'AutoLocalNormal' if args.local == 'conditional' else 'AutoNormal'} on the "
            "local sites); PSIS n/a (subsampled local latents)"
        )
    else:
        psis_args = problem.full_args if problem.full_args is not None else problem.args
        num = min(args.samples, problem.psis_samples or args.samples)
        diag = psis_diagnostic(problem.model, guide, *psis_args, num_samples=num, seed=args.seed)
        elbo, log_z, k_hat = diag.elbo, diag.log_z, diag.k_hat
        if problem.full_args is not None and problem.full_args is not problem.args:
            notes.append(f"PSIS on full data ({num} draws)")
    with torch.no_grad():
        samples = Predictive(
            problem.model, guide=guide, num_samples=args.samples, return_sites=problem.sites
        )(*problem.args)
    known = problem.log_z is not None
    row = {
        "target": problem.name,
        "method": method,
        "elbo": elbo,
        "log_z": log_z,
        "log_z_error": abs(log_z - problem.log_z) if known else math.nan,
        "kl": problem.log_z - elbo if known else math.nan,
        "k_hat": k_hat,
        "time_s": elapsed,
    }
    row.update(compare(problem, problem.flatten(samples)))
    row["note"] = "; ".join(notes)
    return row


class LaplaceNUTS(NUTS):
    """NUTS with a dense mass matrix that starts from a given inverse mass matrix.

    Pyro starts every adaptation at the identity; on a posterior with a condition number
    of 1e12 (kilpisjarvi) its first windows then run at the maximum tree depth. Here the
    start is the Laplace covariance (packed as Pyro packs a dense block: sites in sorted
    order, each flattened), and the step size is searched again for it.
    """

    def __init__(self, model, inverse_mass_matrix: Tensor | None = None, **kwargs):
        super().__init__(model, full_mass=True, **kwargs)
        self._start_inverse_mass = inverse_mass_matrix

    def _initialize_adapter(self):
        super()._initialize_adapter()
        if self._start_inverse_mass is not None:
            sites = tuple(sorted(self.initial_params))
            self.mass_matrix_adapter.inverse_mass_matrix = {sites: self._start_inverse_mass}
            if self._adapter.adapt_step_size:
                self._adapter.reset_step_size_adaptation(self._initial_params)


def laplace_start(model, args: tuple, seed: int, newton_steps: int = 50):
    """The MAP point in Pyro's unconstrained space (as MCMC ``initial_params``) and the
    inverse negative Hessian there (packed as ``LaplaceNUTS`` expects), by
    saddle-free Newton steps from Pyro's default start. ``(None, None)`` where Newton
    does not converge to a mode with positive definite curvature (a funnel has none)."""
    pyro.set_rng_seed(seed)
    params, potential_fn, _, _ = initialize_model(model, args)
    names = sorted(params)
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]

    def unpack(row: Tensor) -> dict:
        return {n: p.reshape(s) for n, p, s in zip(names, row.split(sizes), shapes)}

    def log_joint(u: Tensor) -> Tensor:
        return -torch.stack([potential_fn(unpack(row)) for row in u])

    u = torch.cat([params[n].detach().reshape(-1) for n in names])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        u, converged = newton_refine(log_joint, u, newton_steps)
        if not converged:
            return None, None
        _, _, hess = log_joint_derivatives(log_joint, u[None])
    try:
        covariance = torch.linalg.inv(-hess[0])
        torch.linalg.cholesky(covariance)
    except RuntimeError:
        return None, None
    return unpack(u.detach()), 0.5 * (covariance + covariance.T)


def run_nuts(problem: Problem, args) -> dict:
    pyro.clear_param_store()
    started = time.perf_counter()
    initial, inverse_mass = (None, None)
    # A subsampled model runs on full data: NUTS needs the exact potential.
    nuts_args = problem.full_args if problem.full_args is not None else problem.args
    if args.nuts_laplace:
        initial, inverse_mass = laplace_start(problem.model, nuts_args, args.seed)
    pyro.set_rng_seed(args.seed)
    kernel = LaplaceNUTS(
        problem.model,
        inverse_mass,
        adapt_mass_matrix=not (args.nuts_fixed_mass and inverse_mass is not None),
        max_tree_depth=args.nuts_max_tree_depth,
        jit_compile=args.nuts_jit,
        ignore_jit_warnings=True,
    )
    mcmc = MCMC(
        kernel,
        num_samples=args.nuts_samples,
        warmup_steps=args.nuts_warmup,
        initial_params=initial,
        disable_progbar=True,
    )
    mcmc.run(*nuts_args)
    elapsed = time.perf_counter() - started
    extra = mcmc.diagnostics()
    row = {
        "target": problem.name,
        "method": "NUTS",
        "elbo": math.nan,
        "log_z": math.nan,
        "log_z_error": math.nan,
        "kl": math.nan,
        "k_hat": math.nan,
        "time_s": elapsed,
        "nuts_laplace": inverse_mass is not None,
        "nuts_divergences": sum(len(v) for v in extra.get("divergences", {}).values()),
    }
    row.update(compare(problem, problem.flatten(mcmc.get_samples())))
    row["note"] = "full data" if nuts_args is not problem.args else ""
    return row


STEP_COST_TARGETS = ("eight_schools", "linreg100")


def step_cost(
    components: int, steps: int = 300, target: str = "eight_schools", device: str = "cpu"
) -> dict:
    """Seconds per SVI step on ``target`` (eight schools, or the 100-D regression
    ``linreg100`` of the zoo) with ``fit_svi``'s defaults, after 20 warm-up steps:
    AutoNormal and AutoIAFNormal (2 transforms; Trace_ELBO), AutoCWM with K location-scale
    components (CWMELBO, one particle) and AutoCWM with every default (``map="auto"``,
    which picks a flow on eight schools, a funnel). On ``device`` the model's arguments
    are moved there and the model's own constants are made there too (the fit runs inside
    ``with torch.device(device)``)."""
    if target == "eight_schools":
        model, args = eight_schools, (EIGHT_SCHOOLS_Y, EIGHT_SCHOOLS_SIGMA)
    elif target in STEP_COST_TARGETS:
        posterior = ZOO[target](seed=0)
        model, args = posterior.model, posterior.args
    else:
        raise ValueError(f"step cost: unknown target {target!r}, not one of {STEP_COST_TARGETS}")
    times, chosen = {}, None
    with torch.device(device):
        for name in ("AutoNormal", "AutoIAFNormal", "AutoCWM", "AutoCWM:auto"):
            pyro.clear_param_store()
            pyro.set_rng_seed(0)
            loss = None  # fit_svi's default
            if name == "AutoNormal":
                guide = AutoNormal(model)
            elif name == "AutoIAFNormal":
                guide = AutoIAFNormal(model, num_transforms=2)
            elif name == "AutoCWM":
                # location-scale maps, as the step-cost goal was set for
                guide = AutoCWM(model, num_components=components, map="location_scale")
                loss = CWMELBO()
            else:
                guide = AutoCWM(model, num_components=components)
            options = {"loss": loss, "progress": False, "device": device}
            fit_svi(model, guide, *args, num_steps=20, **options)
            history = fit_svi(model, guide, *args, num_steps=steps, **options)
            times[name] = history["time_s"] / steps
            if name == "AutoCWM:auto":
                chosen = guide.map_chosen
    ratio = times["AutoCWM"] / times["AutoNormal"]
    return {
        "target": target,
        "device": device,
        "K": components,
        "steps": steps,
        "autonormal_s": times["AutoNormal"],
        "autoiafnormal_s": times["AutoIAFNormal"],
        "autocwm_s": times["AutoCWM"],
        "ratio": ratio,
        "ratio_over_K": ratio / components,
        "autocwm_auto_s": times["AutoCWM:auto"],
        "auto_map": chosen,
        "auto_over_iaf": times["AutoCWM:auto"] / times["AutoIAFNormal"],
    }


METHODS = ["AutoNormal", "AutoMVN", "AutoIAFNormal", "AutoCWM", "NUTS"]
COLUMNS = [
    "elbo",
    "log_z",
    "log_z_error",
    "kl",
    "k_hat",
    "energy",
    "mean_err",
    "sd_ratio",
    "sd_min",
    "sd_max",
    "mode_err",
    "time_s",
]


def table(rows: list[dict]) -> str:
    """The rows as a text table: one line per (target, method), the notes at the end."""
    lines = [f"{'target':18s} {'method':14s} " + " ".join(f"{c:>11s}" for c in COLUMNS)]
    for r in rows:
        values = " ".join(f"{r.get(c, math.nan):11.4f}" for c in COLUMNS)
        note = f"  {r['note']}" if r.get("note") else ""
        lines.append(f"{r['target']:18s} {r['method']:14s} {values}{note}")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(
        prog="python -m inference.bench.vi",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--targets", default=",".join(list(TARGETS) + POSTERIORS + list(ZOO)))
    p.add_argument(
        "--methods", default="AutoNormal,AutoMVN,AutoIAFNormal,AutoCWM,AutoCWM:flow,NUTS"
    )
    p.add_argument("--components", type=int, default=8)
    p.add_argument(
        "--local",
        choices=["conditional", "mean-field"],
        default="conditional",
        help="the local part of a guide list: AutoLocalNormal or AutoNormal",
    )
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument(
        "--fit-defaults",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="train every SVI method with fit_svi's own defaults, as users get them (its "
        "optimizer and step schedule; its loss: CWMELBO() for AutoCWM (one particle for "
        "location-scale maps, four for richer ones), "
        "Trace_ELBO or, with enumerated sites, TraceEnum_ELBO for the others); "
        "--no-fit-defaults: the bench's own Adam schedule (--lr, --lr-hold, --lr-decay) "
        "and --cwm-particles",
    )
    p.add_argument(
        "--cwm-particles",
        type=int,
        default=4,
        help="particles of AutoCWM's CWMELBO (with --no-fit-defaults)",
    )
    p.add_argument("--lr", type=float, default=0.01, help="with --no-fit-defaults")
    p.add_argument(
        "--lr-decay",
        type=float,
        default=0.1,
        help="final step size as a fraction of --lr (1: constant), the same for every method "
        "(with --no-fit-defaults)",
    )
    p.add_argument(
        "--lr-hold",
        type=float,
        default=2 / 3,
        help="fraction of the steps at the constant step size --lr before the decay (with "
        "--no-fit-defaults)",
    )
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--nuts-warmup", type=int, default=500)
    p.add_argument("--nuts-samples", type=int, default=1000)
    p.add_argument("--nuts-max-tree-depth", type=int, default=10)
    p.add_argument(
        "--nuts-laplace",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start NUTS at the MAP with the Laplace covariance as inverse mass matrix",
    )
    p.add_argument(
        "--nuts-fixed-mass",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the Laplace mass matrix (no adaptation) where there is one",
    )
    p.add_argument("--nuts-jit", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--fit-seeds",
        default=None,
        help="comma-separated seeds of the fits (and of NUTS) on the target drawn with --seed "
        "(default: --seed alone); with several, the rows are followed by the mean, median "
        "and worst over them: a minibatch fit ends a random distance from its optimum",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--refpost", type=Path, default=DEFAULT_REFPOST)
    p.add_argument("--out", default=None, help="JSON file (default bench-out/vi.json)")
    p.add_argument(
        "--step-cost",
        action="store_true",
        help="only time SVI steps of AutoCWM against AutoNormal (--step-cost-* options)",
    )
    p.add_argument(
        "--step-cost-targets",
        default="eight_schools",
        help=f"comma list of {','.join(STEP_COST_TARGETS)}",
    )
    p.add_argument("--step-cost-components", default="2,4,8,16", help="comma list of K")
    p.add_argument("--step-cost-steps", type=int, default=300, help="timed steps per guide")
    p.add_argument("--device", default="cpu", help="device of the --step-cost runs")
    args = p.parse_args(argv)
    for name in args.targets.split(","):
        if name not in TARGETS and name not in ZOO and name not in POSTERIORS:
            p.error(f"unknown target {name!r}")
    for method in args.methods.split(","):
        kind = method.partition(":")[0]
        if method not in METHODS and kind != "AutoCWM":
            p.error(f"unknown method {method!r}")
    torch.set_num_threads(args.threads)
    if args.step_cost:
        targets = args.step_cost_targets.split(",")
        for name in targets:
            if name not in STEP_COST_TARGETS:
                p.error(f"unknown step-cost target {name!r}")
        rows = []
        for name in targets:
            for k in args.step_cost_components.split(","):
                rows.append(step_cost(int(k), args.step_cost_steps, name, args.device))
                print(json.dumps(rows[-1]), flush=True)
        if args.out:
            write_report(args, rows, args.out)
        return rows
    fit_seeds = [args.seed] if args.fit_seeds is None else parse_seeds(p, args.fit_seeds)
    rows = []
    for name in args.targets.split(","):
        if name in TARGETS:
            problem = analytic_problem(name, args.samples, args.seed)
        elif name in ZOO:
            problem = zoo_problem(name, args.seed)
        else:
            problem = posteriordb_problem(name, args.refpost)
        for method in args.methods.split(","):
            for fit_seed in fit_seeds:
                run_args = argparse.Namespace(**{**vars(args), "seed": fit_seed})
                try:
                    if method == "NUTS":
                        row = run_nuts(problem, run_args)
                    else:
                        row = run_vi(problem, method, run_args)
                except Exception as error:  # a method that cannot handle this target
                    row = failed_row(problem, method, error)
                if len(fit_seeds) > 1:
                    row["fit_seed"] = fit_seed
                    row["note"] = "; ".join(filter(None, [f"fit seed {fit_seed}", row["note"]]))
                print(json.dumps(row), flush=True)
                rows.append(row)
    if args.fit_defaults:
        training = "fit_svi's defaults (ClippedAdam, default_step_size, default loss)"
    else:
        training = (
            f"Adam lr {args.lr} for {args.lr_hold:.3g} of them, then decaying to "
            f"{args.lr * args.lr_decay:g}, {args.cwm_particles} particles for AutoCWM"
        )
    print(
        f"\nsteps {args.steps}, {training}, "
        f"K {args.components}, samples {args.samples}, "
        f"NUTS {args.nuts_warmup}+{args.nuts_samples}, torch threads {torch.get_num_threads()}"
    )
    print(table(rows))
    if len(fit_seeds) > 1:
        print(f"\nover fit seeds {args.fit_seeds}:\n{seed_summary(rows)}")
    write_report(args, rows, args.out or "bench-out/vi.json")
    return rows


def parse_seeds(parser: argparse.ArgumentParser, text: str) -> list[int]:
    """The integers of a comma-separated list, or a parser error naming ``--fit-seeds``."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        parser.error(f"--fit-seeds must be comma-separated integers, got {text!r}")
    if len(set(seeds)) != len(seeds):
        parser.error(f"--fit-seeds has a repeated seed: {text!r}")
    return seeds


def seed_summary(rows: list[dict]) -> str:
    """Mean, median and worst (largest) energy distance and worst mean error of each
    (target, method) over its rows (one per fit seed), a line each."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["target"], row["method"]), []).append(row)
    lines = [
        f"{'target':18s} {'method':14s} {'n':>3s} "
        + " ".join(f"{c:>11s}" for c in ("energy mean", "median", "worst", "err mean", "worst"))
    ]
    for (target, method), group in groups.items():
        energy, error = ([r[c] for r in group] for c in ("energy", "mean_err"))
        figures = [statistics.fmean(energy), statistics.median(energy), max(energy)]
        figures += [statistics.fmean(error), max(error)]
        values = " ".join(f"{v:11.4f}" for v in figures)
        lines.append(f"{target:18s} {method:14s} {len(group):3d} {values}")
    return "\n".join(lines)


def write_report(args: argparse.Namespace, rows: list[dict], out: str | Path) -> None:
    """The arguments and the rows as JSON in ``out`` (its folder is created)."""
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(
        json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2)
    )


if __name__ == "__main__":
    main()
