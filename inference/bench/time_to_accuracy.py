"""Time to accuracy: AutoCWM with its defaults against Pyro's NUTS on posteriordb posteriors.

For each reference posterior of ``--refpost`` (posteriordb, Stan reference draws; loaded as
``inference.bench.vi`` loads them) the bench measures what it costs to reach a given
accuracy, in wall time and in gradient evaluations of the log density (the measure of the
Pathfinder paper, Zhang et al. 2022). Accuracy is vi.py's (``compare``): ``mean_err``, the
worst standardized error of the marginal means against the reference draws, with the range
of the sd ratios sd_q / sd_p.

- **AutoCWM**, fitted as ``inference.bench.vi`` fits it (``make_guide``: K = ``--components``,
  every AutoCWM option at its default; ``fit_svi``'s defaults and its default loss,
  ``CWMELBO()``; ``--steps`` steps). At every ``1/--checkpoints`` of the steps, ``--samples``
  guide draws (the same seeded base draws each time, the fit's random state untouched;
  neither timed nor counted) give ``mean_err``; E is its value at the end. Its wall time
  includes the set-up (the start's climb, Newton steps, Hessians).
- **NUTS**: ``NUTS(model)`` with Pyro's defaults (step size and diagonal mass matrix
  adapted, ``init_to_uniform``, max tree depth 10), ``--nuts-warmup`` + ``--nuts-samples``,
  one chain, seed ``--seed``; ``MCMC``'s ``hook_fn`` times every iteration. Every
  ``--nuts-check-every`` draws, the draws so far (post-warmup) give a running ``mean_err``.
  A run stops at ``--nuts-max-seconds`` and keeps its draws so far. ``--laplace-nuts`` adds
  vi.py's NUTS, labelled ``NUTS (Laplace)``: ``laplace_start`` (Newton to the MAP; its
  Hessians counted) and ``LaplaceNUTS`` with the Laplace covariance as a fixed dense mass
  matrix.

Reaching a level (``add_reach``): the first checkpoint from which ``mean_err`` stays at or
below it to the end (``first_within``); its wall time and gradient evaluations (set-up and
warmup included). Levels per target: ``E``; ``E+`` = E plus one standard error of a
reference mean (1/sqrt(10,000) = 0.01 sd; ``--slack``), below which two errors cannot be
told apart against these references (E itself is often below it); and ``--levels``.

Gradient evaluations (``GradientCounter``, by instrumentation, results unchanged): each row
of a differentiated call of ``unconstrained_log_joint`` counts one (the climb: every start
at each of its Adam steps; an SVI step: K component images x particles); a Hessian at a
point counts d, the rows of ``log_joint_derivatives``' double-backward pass (also given as
``hessian_points``); each call of Pyro's ``potential_grad`` counts one (NUTS: one per
leapfrog step, plus its start, step-size searches and cache refills). Value-only rows
(Newton's line search, the Laplace misfit, secant widths) are ``value_points``, outside the
total. AutoCWM evaluates its rows in vectorized calls of the model, NUTS one point a call.
The rule covers AutoCWM's start up to ``laplace_max_dim`` (200) dimensions, as here; above
it the Hessian-vector products of its low-rank curvature would count as gradient rows.

NumPyro is not compared: ``pip install numpyro`` would work (numpyro 0.22 with jax and
jaxlib 0.10.2, nothing installed changed), but the targets are Pyro models, and each would
have to be rewritten in NumPyro and checked against the Pyro density first.

    python -m inference.bench.time_to_accuracy                     # the default targets
    python -m inference.bench.time_to_accuracy --targets arK,nes --laplace-nuts

The default targets (the other eight, 28 minutes on a shared 2-core machine, one thread)
leave out three on which Pyro's default NUTS would take most of the run: diamonds (26-D,
badly conditioned) and hmm_drive_0 made 100 and 90 of their 1,500 iterations in their first
minute (diamonds: many at the maximum tree depth, 1,023 leapfrog steps, 6 ms a gradient;
hmm_drive_0: 20 ms a gradient), and gp_pois_regr did not finish its warmup in 300 s.
``--targets`` runs them, within ``--nuts-max-seconds``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from unittest import mock

import pyro
import pyro.ops.integrator
import pyro.poutine as poutine
import torch
from pyro.infer import MCMC, NUTS, Predictive
from torch import Tensor

import pyro_cwm.guides.laplace
import pyro_cwm.guides.log_joint
from inference.bench import write_rows
from inference.bench.vi import (
    DEFAULT_REFPOST,
    LaplaceNUTS,
    Problem,
    compare,
    laplace_start,
    make_guide,
    posteriordb_problem,
)
from inference.svi import fit_svi
from inference.svi.elbo import CWMELBO
from pyro_cwm.data.posteriordb import POSTERIORS

SLOW_NUTS = ("diamonds", "hmm_drive_0", "gp_pois_regr")
DEFAULT_TARGETS = [name for name in POSTERIORS if name not in SLOW_NUTS]


class GradientCounter:
    """Counts the points at which the model's log density is evaluated, while active.

    A context manager: on entry it wraps ``unconstrained_log_joint``,
    ``log_joint_derivatives`` and Pyro's ``potential_grad`` in every loaded module that holds
    them (the results are unchanged); on exit it puts them back. ``paused`` stops counting.

    Attributes:
        gradients: rows of differentiated ``unconstrained_log_joint`` calls (outside
            Hessians), plus calls of ``potential_grad``.
        hessian_points: points at which ``log_joint_derivatives`` computed a Hessian.
        hessian_rows: their rows, d per point.
        value_points: rows evaluated without a gradient.
    """

    def __init__(self) -> None:
        self.gradients = self.hessian_points = self.hessian_rows = self.value_points = 0
        self.paused = False
        self._in_hessian = 0
        self._stack = contextlib.ExitStack()

    @property
    def total(self) -> int:
        """Gradient evaluations: ``gradients + hessian_rows``."""
        return self.gradients + self.hessian_rows

    def _log_joint(self, original: Callable) -> Callable:
        def counted(model, guide, latent: Tensor, *args, **kwargs) -> Tensor:
            if not (self.paused or self._in_hessian):
                rows = latent.shape[0] if latent.dim() > 1 else 1
                if torch.is_grad_enabled() and latent.requires_grad:
                    self.gradients += rows
                else:
                    self.value_points += rows
            return original(model, guide, latent, *args, **kwargs)

        return counted

    def _derivatives(self, original: Callable) -> Callable:
        def counted(log_joint: Callable, u: Tensor):
            if not (self.paused or self._in_hessian):
                self.hessian_points += u.shape[0]
                self.hessian_rows += u.shape[0] * u.shape[1]
            self._in_hessian += 1
            try:
                return original(log_joint, u)
            finally:
                self._in_hessian -= 1

        return counted

    def _potential_grad(self, original: Callable) -> Callable:
        def counted(potential_fn: Callable, z: dict):
            if not (self.paused or self._in_hessian):
                self.gradients += 1
            return original(potential_fn, z)

        return counted

    def __enter__(self) -> GradientCounter:
        wrappers = {
            "unconstrained_log_joint": (
                pyro_cwm.guides.log_joint.unconstrained_log_joint,
                self._log_joint,
            ),
            "log_joint_derivatives": (
                pyro_cwm.guides.laplace.log_joint_derivatives,
                self._derivatives,
            ),
            "potential_grad": (pyro.ops.integrator.potential_grad, self._potential_grad),
        }
        for module in list(sys.modules.values()):
            names = getattr(module, "__dict__", None)
            if not isinstance(names, dict):
                continue
            for attr, (original, wrap) in wrappers.items():
                if names.get(attr) is original:
                    self._stack.enter_context(mock.patch.object(module, attr, wrap(original)))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()


class Stopwatch:
    """Wall time since ``start()``, less the time spent inside ``pause()``."""

    def __init__(self) -> None:
        self._started = time.perf_counter()
        self._paused = 0.0

    def start(self) -> None:
        self._started, self._paused = time.perf_counter(), 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self._started - self._paused

    @contextlib.contextmanager
    def pause(self, counter: GradientCounter | None = None) -> Iterator[None]:
        """Neither timed nor (with ``counter``) counted inside."""
        began = time.perf_counter()
        if counter is not None:
            counter.paused = True
        try:
            yield
        finally:
            if counter is not None:
                counter.paused = False
            self._paused += time.perf_counter() - began


def first_within(errors: Sequence[float], level: float) -> int | None:
    """The first index from which every error is at or below ``level`` (NaN counts as
    above); None where the last one is above it or ``errors`` is empty."""
    index = None
    for i, error in enumerate(errors):
        if error <= level:  # False for NaN
            index = i if index is None else index
        else:
            index = None
    return index


class CheckpointedCWMELBO(CWMELBO):
    """``CWMELBO()`` (``fit_svi``'s default loss for AutoCWM) that calls ``callback(step)``
    before the step numbered ``step`` (after ``step`` steps) for every ``step`` in
    ``steps``; the loss, its gradients and the random state are unchanged."""

    def __init__(self, steps: set[int], callback: Callable[[int], None]) -> None:
        super().__init__()
        self._checkpoints, self._callback = steps, callback

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        if self.step in self._checkpoints:
            self._callback(self.step)
        return super().loss_and_grads(model, guide, *args, **kwargs)


def _accuracy(problem: Problem, draws: Tensor) -> dict:
    row = compare(problem, draws)
    return {key: row[key] for key in ("mean_err", "sd_min", "sd_max", "energy")}


def _guide_draws(problem: Problem, guide, num: int) -> Tensor:
    """``num`` guide draws of the compared sites (num, P), in one vectorized run where it
    works: the guide alone, else the guide with the model (deterministic sites), else
    vi.py's way, one run of the guide and the model per draw."""
    runs = (
        lambda: Predictive(guide, num_samples=num, parallel=True, return_sites=problem.sites)(
            *problem.args
        ),
        lambda: Predictive(
            problem.model, guide=guide, num_samples=num, parallel=True, return_sites=problem.sites
        )(*problem.args),
    )
    for run in runs:
        try:
            samples = run()
        except (RuntimeError, ValueError, IndexError, TypeError, KeyError):
            continue
        if set(problem.sites) <= set(samples):
            return problem.flatten(samples)
    samples = Predictive(problem.model, guide=guide, num_samples=num, return_sites=problem.sites)(
        *problem.args
    )
    return problem.flatten(samples)


def _guide_accuracy(problem: Problem, guide, num: int, seed: int) -> dict:
    """``compare`` on ``num`` guide draws from a seeded random state (then restored)."""
    with torch.random.fork_rng(), poutine.block(), torch.no_grad():
        torch.manual_seed(seed)
        draws = _guide_draws(problem, guide, num)
    return _accuracy(problem, draws)


def run_autocwm(problem: Problem, args: argparse.Namespace) -> dict:
    """AutoCWM fitted as vi.py's ``run_vi`` fits it, with accuracy at checkpoints.

    Returns:
        The row: final accuracy (E = ``mean_err``), wall time and gradient evaluations (set-up
        included), ``setup_s`` and ``setup_grads`` (the start and the first step) and the
        ``trajectory`` of checkpoints ``{step, time_s, grads, mean_err, sd_min, sd_max, energy}``.
    """
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    guide, loss = make_guide("AutoCWM", problem.model, args.components, problem, None)
    assert loss is None  # fit_svi's default loss, which CheckpointedCWMELBO is
    every = max(1, args.steps // args.checkpoints)
    steps = set(range(every, args.steps, every))
    clock, trajectory, setup = Stopwatch(), [], {}

    with GradientCounter() as counter:

        def checkpoint(step: int) -> None:
            if step == 1:
                setup.update(setup_s=clock.elapsed(), setup_grads=counter.total)
            if step not in steps:
                return
            point = {"step": step, "time_s": clock.elapsed(), "grads": counter.total}
            with clock.pause(counter):
                point.update(_guide_accuracy(problem, guide, args.samples, args.seed))
            trajectory.append(point)

        clock.start()
        fit_svi(
            problem.model,
            guide,
            *problem.args,
            num_steps=args.steps,
            loss=CheckpointedCWMELBO(steps | {1}, checkpoint),
            progress=False,
        )
        final = {"step": args.steps, "time_s": clock.elapsed(), "grads": counter.total}
        with clock.pause(counter):
            final.update(_guide_accuracy(problem, guide, args.samples, args.seed))
        trajectory.append(final)
        counts = {
            "grad_evals": counter.total,
            "gradient_points": counter.gradients,
            "hessian_points": counter.hessian_points,
            "hessian_rows": counter.hessian_rows,
            "value_points": counter.value_points,
        }
    return {
        "target": problem.name,
        "method": "AutoCWM",
        "dim": int(problem.reference.shape[1]),
        "K": args.components,
        "slack": 1 / math.sqrt(problem.reference.shape[0]),
        "steps": args.steps,
        "map": guide.map_chosen,
        **{key: final[key] for key in ("mean_err", "sd_min", "sd_max", "energy")},
        "time_s": final["time_s"],
        **counts,
        **setup,
        "trajectory": trajectory,
    }


class _OutOfTime(Exception):
    """Raised by the hook to stop a NUTS run at ``--nuts-max-seconds``."""


def run_nuts(problem: Problem, args: argparse.Namespace, laplace: bool = False) -> dict:
    """NUTS with Pyro's defaults (``laplace``: vi.py's Laplace-started NUTS), timed and
    counted per iteration, with its running accuracy every ``--nuts-check-every`` draws.

    Returns:
        The row: totals (set-up and warmup included), the accuracy of all its draws,
        ``grads_per_iteration`` (warmup, then draws; set-up in ``setup_grads``) and the
        ``trajectory`` of checkpoints ``{draws, time_s, grads, mean_err, sd_min, sd_max,
        energy}`` (``time_s`` and ``grads`` at that draw).
    """
    pyro.clear_param_store()
    clock = Stopwatch()
    times, totals, draws = [], [], []
    with GradientCounter() as counter:
        clock.start()
        initial = inverse_mass = None
        if laplace:
            initial, inverse_mass = laplace_start(problem.model, problem.args, args.seed)
        pyro.set_rng_seed(args.seed)
        if laplace:
            kernel = LaplaceNUTS(
                problem.model,
                inverse_mass,
                adapt_mass_matrix=inverse_mass is None,
                ignore_jit_warnings=True,
            )
        else:
            kernel = NUTS(problem.model)
        setup = kernel.setup

        def timed_setup(*a, **k):
            setup(*a, **k)
            times.append(clock.elapsed())
            totals.append(counter.total)

        kernel.setup = timed_setup

        def hook(kernel, params: dict, stage: str, i: int) -> None:
            times.append(clock.elapsed())
            totals.append(counter.total)
            if stage.startswith("Sample"):
                draws.append({name: value.detach().clone() for name, value in params.items()})
            if times[-1] > args.nuts_max_seconds:
                raise _OutOfTime

        mcmc = MCMC(
            kernel,
            num_samples=args.nuts_samples,
            warmup_steps=args.nuts_warmup,
            initial_params=initial,
            hook_fn=hook,
            disable_progbar=True,
        )
        capped = False
        try:
            mcmc.run(*problem.args)
        except _OutOfTime:
            capped = True
        elapsed, total = clock.elapsed(), counter.total
    divergences = math.nan
    if not capped:
        extra = mcmc.diagnostics()
        divergences = sum(len(v) for v in extra.get("divergences", {}).values())
    warmup = min(args.nuts_warmup, len(times) - 1)
    trajectory = []
    if draws:
        constrained = {
            name: kernel.transforms[name].inv(torch.stack([d[name] for d in draws]))
            if name in kernel.transforms
            else torch.stack([d[name] for d in draws])
            for name in draws[0]
        }
        if not set(problem.sites) <= set(constrained):  # deterministic sites (garch11)
            with torch.no_grad():
                constrained = Predictive(
                    problem.model, posterior_samples=constrained, return_sites=problem.sites
                )(*problem.args)
        flat = problem.flatten(constrained)
        marks = list(range(args.nuts_check_every, len(draws), args.nuts_check_every))
        for count in marks + [len(draws)]:
            index = warmup + count  # times[0] is the set-up
            point = {"draws": count, "time_s": times[index], "grads": totals[index]}
            point.update(_accuracy(problem, flat[:count]))
            trajectory.append(point)
    row = {
        "target": problem.name,
        "method": "NUTS (Laplace)" if laplace else "NUTS",
        "warmup": args.nuts_warmup,
        "draws": len(draws),
        "capped": capped,
        "time_s": elapsed,
        "grad_evals": total,
        "setup_s": times[0] if times else math.nan,
        "setup_grads": totals[0] if totals else total,
        "warmup_s": times[warmup] if times else math.nan,
        "warmup_grads": totals[warmup] if totals else total,
        "divergences": divergences,
        "laplace_mass": inverse_mass is not None if laplace else None,
    }
    last = trajectory[-1] if trajectory else {}
    row.update({key: last.get(key, math.nan) for key in ("mean_err", "sd_min", "sd_max")})
    row["grads_per_iteration"] = [b - a for a, b in zip(totals, totals[1:])]
    row["trajectory"] = trajectory
    return row


def add_reach(rows: list[dict], levels: Sequence[float], slack: float | None = None) -> None:
    """Add to each row ``reach``: for each level, the first checkpoint from which its
    ``mean_err`` stays at or below it (``first_within``), as ``{level, at, s, grads}``
    (``at``: the step or the draws; None and NaN where it never does).

    The levels, per target: ``E`` (AutoCWM's final ``mean_err`` there), ``E+`` (E plus
    ``slack``; None: the AutoCWM row's ``slack``, one standard error of a reference mean,
    1 / sqrt(reference draws)) and each of ``levels``, named by its value. Rows of a
    target without an AutoCWM row get the fixed levels only.
    """
    final = {r["target"]: r for r in rows if r["method"] == "AutoCWM"}
    for row in rows:
        named = {f"{level:g}": level for level in levels}
        if row["target"] in final:
            cwm = final[row["target"]]
            error, margin = cwm["mean_err"], cwm["slack"] if slack is None else slack
            named = {"E": error, "E+": error + margin, **named}
        errors = [p["mean_err"] for p in row["trajectory"]]
        row["reach"] = {}
        for name, level in named.items():
            index = first_within(errors, level)
            point = row["trajectory"][index] if index is not None else {}
            row["reach"][name] = {
                "level": level,
                "at": point.get("step", point.get("draws")),
                "s": point.get("time_s", math.nan),
                "grads": point.get("grads", math.nan),
            }


def _figure(value: float, spec: str = ".3g") -> str:
    """A time or a ratio (three figures) or, with ``spec=".0f"``, a count; ``-`` for NaN
    (not reached)."""
    return "-" if math.isnan(value) else format(value, spec)


def table(rows: list[dict], fixed: str) -> str:
    """One line per row: its final ``mean_err`` and sd range, wall time and gradient
    evaluations, then time and evaluations to reach ``E+`` and the level named ``fixed``;
    for NUTS the ratios of its time and evaluations to ``E+`` to AutoCWM's totals
    (``>``: lower bounds, where NUTS did not reach it within its draws)."""
    lines = [
        f"{'target':18s} {'method':15s} {'mean_err':>8s} {'sd range':>11s} {'time_s':>7s} "
        f"{'grads':>8s} | {'E+ level':>8s} {'s':>7s} {'grads':>8s} {'x time':>7s} "
        f"{'x grads':>7s} | {fixed + ': s':>8s} {'grads':>8s}"
    ]
    cwm = {r["target"]: r for r in rows if r["method"] == "AutoCWM"}
    for r in rows:
        sd = f"{r['sd_min']:.2f}-{r['sd_max']:.2f}"
        reach, ref = r["reach"].get("E+"), cwm.get(r["target"])
        line = (
            f"{r['target']:18s} {r['method']:15s} {r['mean_err']:8.3f} {sd:>11s} "
            f"{r['time_s']:7.1f} {r['grad_evals']:8d} | "
        )
        if reach is None:
            line += f"{'':>8s} {'':>7s} {'':>8s} {'':>7s} {'':>7s} | "
        else:
            line += f"{reach['level']:8.3f} {_figure(reach['s']):>7s} "
            line += f"{_figure(reach['grads'], '.0f'):>8s} "
            if r["method"] == "AutoCWM" or ref is None:
                line += f"{'':>7s} {'':>7s} | "
            else:
                times = (reach["s"], r["time_s"], ref["time_s"])
                grads = (reach["grads"], r["grad_evals"], ref["grad_evals"])
                ratios = [
                    f">{total / base:.3g}" if math.isnan(value) else _figure(value / base)
                    for value, total, base in (times, grads)
                ]
                line += f"{ratios[0]:>7s} {ratios[1]:>7s} | "
        at = r["reach"].get(fixed, {"s": math.nan, "grads": math.nan})
        line += f"{_figure(at['s']):>8s} {_figure(at['grads'], '.0f'):>8s}"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(
        prog="python -m inference.bench.time_to_accuracy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS))
    p.add_argument("--components", type=int, default=8, help="AutoCWM's K (vi.py's default)")
    p.add_argument("--steps", type=int, default=3000, help="fit_svi steps (vi.py's default)")
    p.add_argument("--checkpoints", type=int, default=20, help="accuracy checks over the fit")
    p.add_argument("--samples", type=int, default=4000, help="guide draws per check")
    p.add_argument(
        "--slack",
        type=float,
        default=None,
        help="the level E+ is AutoCWM's final mean_err E plus this (default: one standard "
        "error of a reference mean, 1/sqrt(reference draws))",
    )
    p.add_argument("--levels", default="0.1", help="fixed mean_err levels, comma-separated")
    p.add_argument("--nuts-warmup", type=int, default=500)
    p.add_argument("--nuts-samples", type=int, default=1000)
    p.add_argument("--nuts-check-every", type=int, default=50, help="draws between checks")
    p.add_argument(
        "--nuts-max-seconds",
        type=float,
        default=300.0,
        help="stop a NUTS run here (set-up and warmup included) and use its draws so far",
    )
    p.add_argument(
        "--laplace-nuts",
        action="store_true",
        help="add vi.py's NUTS (MAP start, Laplace covariance as fixed mass matrix)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--refpost", type=Path, default=DEFAULT_REFPOST)
    p.add_argument("--out", default="bench-out/time_to_accuracy.json")
    args = p.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    unknown = [t for t in targets if t not in POSTERIORS]
    if unknown:
        p.error(f"unknown targets {unknown}; choose from {','.join(POSTERIORS)}")
    for name in ("components", "steps", "checkpoints", "samples", "nuts_check_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    try:
        levels = [float(level) for level in args.levels.split(",") if level]
    except ValueError:
        p.error(f"--levels must be comma-separated numbers, got {args.levels!r}")
    torch.set_num_threads(args.threads)
    rows = []
    for name in targets:
        problem = posteriordb_problem(name, args.refpost)
        cwm = run_autocwm(problem, args)
        rows.append(cwm)
        print(json.dumps({k: v for k, v in cwm.items() if k != "trajectory"}), flush=True)
        for laplace in (False, True) if args.laplace_nuts else (False,):
            row = run_nuts(problem, args, laplace)
            rows.append(row)
            brief = {k: v for k, v in row.items() if k not in ("trajectory", "grads_per_iteration")}
            print(json.dumps(brief), flush=True)
    print(
        f"\nAutoCWM: K {args.components}, {args.steps} steps, fit_svi's defaults; NUTS: "
        f"{args.nuts_warmup} + {args.nuts_samples}, cap {args.nuts_max_seconds:g} s; seed "
        f"{args.seed}; torch threads {torch.get_num_threads()}"
    )
    add_reach(rows, levels, args.slack)
    print(table(rows, f"{levels[0]:g}" if levels else "E"))
    write_rows(rows, args.out)
    return rows


if __name__ == "__main__":
    main()
