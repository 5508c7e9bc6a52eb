"""Does the fit depend on the seed? AutoCWM with every default, one fit per seed.

Issue 23: on a flat-prior regression with a posterior correlation of -0.999 the start
confirmed a mode on some seeds only; ``map="auto"`` then chose location-scale maps (an
exact fit) or the autoregressive flow (2.8 to 110 posterior sds off), by chance. For each
target and seed in ``--seeds`` this bench builds ``AutoCWM(model)`` (every option at its
default, K = 4) and fits it with ``fit_svi``'s defaults for ``--steps`` steps, then
reports: the map the start chose, whether it confirmed a mode, the worst marginal-mean
error in reference posterior sds and the range of the sd ratios (``--samples`` draws
against the reference draws), whether ``fit_svi`` warned that the fit had not converged,
and the times. ``ok`` is the issue's target: mean error within 0.2 sd, sd ratios in
[0.8, 1.25]. ``--start-only`` stops after the start (the map decision in seconds).

Targets: ``flat_regression`` (bound 100) and ``flat_regression_wide`` (bound 1,000): a
regression of a log outcome on an uncentered height-like covariate (N(66, 4^2)), a binary
covariate and their product, 1,000 rows, float32, flat ``Uniform(-bound, bound)`` priors
on the four coefficients and ``Uniform(0, bound)`` on the noise scale; exact draws from
its Normal-Inverse-Gamma posterior (the bounds are hundreds of sds away). And the
posteriordb posteriors of ``inference.bench.vi`` (read from ``--refpost``).

    python -m inference.bench.start_seeds --targets flat_regression,flat_regression_wide
    python -m inference.bench.start_seeds --targets kilpisjarvi,nes --seeds 0,1,2,3
    python -m inference.bench.start_seeds --start-only          # the map decision only
"""

from __future__ import annotations

import argparse
import json
import math
import time
import warnings
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import Predictive
from torch import Tensor

from inference.bench.vi import DEFAULT_REFPOST, Problem, compare, posteriordb_problem
from inference.svi import fit_svi
from pyro_cwm.data.posteriordb import POSTERIORS, ReferencePosterior
from pyro_cwm.guides import AutoCWM

FLAT_BOUNDS = {"flat_regression": 100.0, "flat_regression_wide": 1000.0}
DEFAULT_TARGETS = (*FLAT_BOUNDS, "kilpisjarvi", "nes", "diamonds", "eight_schools", "arK")


def flat_regression(x: Tensor, y: Tensor, bound: float = 100.0) -> None:
    """Linear regression with flat priors: beta ~ Uniform(-bound, bound)^p, sigma ~
    Uniform(0, bound), y ~ N(x beta, sigma^2) (``x`` (N, p) with a column of ones)."""
    one = torch.ones((), dtype=x.dtype)
    low, high = -bound * one, bound * one
    beta = pyro.sample("beta", dist.Uniform(low, high).expand([x.shape[1]]).to_event(1))
    sigma = pyro.sample("sigma", dist.Uniform(0 * one, high))
    pyro.sample("y", dist.Normal(beta @ x.T, sigma[..., None]).to_event(1), obs=y)


def flat_regression_data(
    num_points: int = 1000, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """Earnings-like data: log outcome on an uncentered height (N(66, 4^2)), a binary
    covariate and their product; ``(x (N, 4) with a column of ones, y (N,))``."""
    generator = torch.Generator().manual_seed(seed)
    height = 66 + 4 * torch.randn(num_points, generator=generator, dtype=torch.float64)
    male = (torch.rand(num_points, generator=generator, dtype=torch.float64) < 0.5).double()
    x = torch.stack([torch.ones_like(height), height, male, height * male], -1)
    beta = torch.tensor([8.4, 0.017, -0.08, 0.007], dtype=torch.float64)
    y = x @ beta + 0.88 * torch.randn(num_points, generator=generator, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def flat_regression_draws(x: Tensor, y: Tensor, num_draws: int, seed: int = 0) -> Tensor:
    """Exact posterior draws (num_draws, p + 1) of ``(beta, sigma)`` for flat priors
    (bounds far away): sigma^2 ~ Inv-Gamma((N - p - 1) / 2, SSR / 2), beta | sigma ~
    N(beta_hat, sigma^2 (x^T x)^-1), in float64."""
    x, y = x.double(), y.double()
    n, p = x.shape
    generator = torch.Generator().manual_seed(seed)
    gram = x.T @ x
    beta_hat = torch.linalg.solve(gram, x.T @ y)
    ssr = (y - x @ beta_hat).pow(2).sum()
    shape = torch.full((num_draws,), (n - p - 1) / 2, dtype=torch.float64)
    gamma = torch._standard_gamma(shape, generator=generator)
    sigma = (ssr / 2 / gamma).sqrt()
    chol = torch.linalg.cholesky(torch.linalg.inv(gram))
    eps = torch.randn(num_draws, p, generator=generator, dtype=torch.float64)
    beta = beta_hat + sigma[:, None] * (eps @ chol.T)
    return torch.cat((beta, sigma[:, None]), -1)


def flat_regression_problem(name: str, num_points: int = 1000, seed: int = 0) -> Problem:
    """The flat-prior regression of ``FLAT_BOUNDS[name]`` as a bench problem."""
    bound = FLAT_BOUNDS[name]
    x, y = flat_regression_data(num_points, seed)

    def model(x: Tensor, y: Tensor) -> None:
        flat_regression(x, y, bound)

    columns = [f"beta[{i + 1}]" for i in range(x.shape[1])] + ["sigma"]
    posterior = ReferencePosterior(
        name, model, (x, y), columns, flat_regression_draws(x, y, 10_000, seed)
    )
    return Problem(name, model, (x, y), posterior.draws, posterior.flatten, ["beta", "sigma"])


def seed_row(problem: Problem, seed: int, steps: int, samples: int, start_only: bool) -> dict:
    """One seed of AutoCWM with defaults on ``problem``: the start's choice, and unless
    ``start_only`` the fit's errors against the reference draws."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = AutoCWM(problem.model)
    started = time.perf_counter()
    with torch.no_grad():
        guide(*problem.args)  # the start
    row = {"target": problem.name, "seed": seed, "map": guide.map_chosen}
    row["mode"] = guide._best_is_mode
    row["start_s"] = time.perf_counter() - started
    if start_only:
        return row
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            fit_svi(problem.model, guide, *problem.args, num_steps=steps, progress=False)
        except FloatingPointError as error:  # a diverged fit: a row that says so
            row["error"] = str(error).splitlines()[0][:100]
    row["warned"] = any("not converged" in str(w.message) for w in caught)
    row["fit_s"] = time.perf_counter() - started
    if "error" in row:
        row.update(mean_err=math.nan, sd_min=math.nan, sd_max=math.nan, ok=False)
        return row
    with torch.no_grad():
        draws = Predictive(
            problem.model, guide=guide, num_samples=samples, return_sites=problem.sites
        )(*problem.args)
    errors = compare(problem, problem.flatten(draws).double())
    row.update({key: errors[key] for key in ("mean_err", "sd_min", "sd_max")})
    row["ok"] = row["mean_err"] <= 0.2 and 0.8 <= row["sd_min"] and row["sd_max"] <= 1.25
    return row


def table(rows: list[dict]) -> str:
    """The rows as a text table, one line per (target, seed)."""
    lines = [
        f"{'target':22s} {'seed':>4s} {'map':>14s} {'mode':>5s} {'mean_err':>9s} "
        f"{'sd_min':>7s} {'sd_max':>7s} {'ok':>3s} {'warned':>6s} {'start_s':>7s} {'fit_s':>6s}"
    ]
    for r in rows:
        figures = " ".join(
            f"{r.get(c, math.nan):{w}.3f}"
            for c, w in (("mean_err", 9), ("sd_min", 7), ("sd_max", 7))
        )
        ok, warned = ("-" if c not in r else "yes" if r[c] else "no" for c in ("ok", "warned"))
        lines.append(
            f"{r['target']:22s} {r['seed']:4d} {r['map']:>14s} {str(r['mode']):>5s} {figures} "
            f"{ok:>3s} {warned:>6s} {r['start_s']:7.1f} {r.get('fit_s', math.nan):6.1f}"
            + (f"  {r['error']}" if "error" in r else "")
        )
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(
        prog="python -m inference.bench.start_seeds",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS))
    p.add_argument("--seeds", default="0,1,2,3,4,5,6,7", help="comma-separated fit seeds")
    p.add_argument("--steps", type=int, default=2000, help="fit_svi steps")
    p.add_argument("--samples", type=int, default=4000, help="draws compared with the reference")
    p.add_argument("--start-only", action="store_true", help="only the start's decision")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--refpost", type=Path, default=DEFAULT_REFPOST)
    p.add_argument("--out", default="bench-out/start_seeds.json", help="JSON file of the rows")
    args = p.parse_args(argv)
    names = args.targets.split(",")
    for name in names:
        if name not in FLAT_BOUNDS and name not in POSTERIORS:
            p.error(f"unknown target {name!r}")
    seeds = [int(seed) for seed in args.seeds.split(",")]
    torch.set_num_threads(args.threads)
    rows = []
    for name in names:
        if name in FLAT_BOUNDS:
            problem = flat_regression_problem(name)
        else:
            problem = posteriordb_problem(name, args.refpost)
        for seed in seeds:
            rows.append(seed_row(problem, seed, args.steps, args.samples, args.start_only))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nAutoCWM defaults (K 4), fit_svi defaults, {args.steps} steps, seeds {args.seeds}")
    print(table(rows))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"args": vars(args) | {"refpost": str(args.refpost)}, "rows": rows}, indent=2)
    )
    return rows


if __name__ == "__main__":
    main()
