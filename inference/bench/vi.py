"""Variational approximations on analytic targets: AutoCWM against Pyro's autoguides.

For each target (normalized, so log Z = 0, with an exact sampler) and each guide, fits
SVI and reports in one table: ELBO, IS log Z and its error, KL(q||p) = log Z - ELBO
(= -ELBO here), PSIS k-hat, energy distance to exact draws, worst standardized error of
marginal means, worst ratio of marginal sds, worst relative error of a mode's share (where
the target has known modes) and wall time.

    python -m inference.bench.vi                       # every target and guide
    python -m inference.bench.vi --targets ring --steps 500

The posteriordb targets and NUTS as a reference method are not in this script yet.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import pyro
import torch
from pyro.infer.autoguide import AutoIAFNormal, AutoMultivariateNormal, AutoNormal

from inference.diagnostics import psis_diagnostic
from inference.elbo import CWMELBO
from inference.metrics import energy_distance, marginal_errors, worst_mode_share_error
from inference.svi import fit_svi
from pyro_cwm.data.posteriors import EIGHT_SCHOOLS_SIGMA, EIGHT_SCHOOLS_Y, eight_schools
from pyro_cwm.data.targets import TARGETS
from pyro_cwm.guides import AutoCWM


def make_guide(name: str, model, components: int):
    if name == "AutoNormal":
        return AutoNormal(model), None
    if name == "AutoMVN":
        return AutoMultivariateNormal(model), None
    if name == "AutoIAFNormal":
        return AutoIAFNormal(model, num_transforms=2), None
    kind, _, map_name = name.partition(":")
    if kind == "AutoCWM":
        guide = AutoCWM(model, num_components=components, map=map_name or "location_scale")
        return guide, CWMELBO(num_particles=4)
    raise ValueError(f"unknown guide {name!r}")


def run(target_name: str, guide_name: str, args) -> dict:
    target = TARGETS[target_name]()
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    guide, loss = make_guide(guide_name, target.model, args.components)
    started = time.perf_counter()
    fit_svi(
        target.model,
        guide,
        num_steps=args.steps,
        loss=loss,
        progress=False,
        optim=pyro.optim.Adam({"lr": args.lr}),
    )
    elapsed = time.perf_counter() - started
    diag = psis_diagnostic(target.model, guide, num_samples=args.samples, seed=args.seed)
    with torch.no_grad():
        draws = pyro.infer.Predictive(
            target.model, guide=guide, num_samples=args.samples, return_sites=["x"]
        )()["x"].reshape(args.samples, -1)
    exact = target.sample(args.samples, torch.Generator().manual_seed(args.seed))
    mean_err, sd_ratio = marginal_errors(draws, exact)
    row = {
        "target": target_name,
        "guide": guide_name,
        "elbo": diag.elbo,
        "log_z": diag.log_z,
        "log_z_error": abs(diag.log_z),
        "kl": -diag.elbo,
        "k_hat": diag.k_hat,
        "energy": energy_distance(draws, exact),
        "mean_err": mean_err,
        "sd_ratio": sd_ratio,
        "mode_err": (
            worst_mode_share_error(draws, target.modes) if target.modes is not None else math.nan
        ),
        "time_s": elapsed,
    }
    print(json.dumps(row), flush=True)
    return row


def step_cost(components: int, steps: int = 300) -> dict:
    """Seconds per SVI step on eight schools: AutoNormal (Trace_ELBO) against AutoCWM with
    K components (CWMELBO), one particle each; the ratio over K should stay near or below 1.5."""
    y, sigma = EIGHT_SCHOOLS_Y, EIGHT_SCHOOLS_SIGMA
    times = {}
    for name in ("AutoNormal", "AutoCWM"):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        if name == "AutoNormal":
            guide, loss = AutoNormal(eight_schools), pyro.infer.Trace_ELBO()
        else:
            guide, loss = AutoCWM(eight_schools, num_components=components), CWMELBO()
        fit_svi(eight_schools, guide, y, sigma, num_steps=20, loss=loss, progress=False)
        history = fit_svi(
            eight_schools, guide, y, sigma, num_steps=steps, loss=loss, progress=False
        )
        times[name] = history["time_s"] / steps
    ratio = times["AutoCWM"] / times["AutoNormal"]
    return {
        "K": components,
        "autonormal_s": times["AutoNormal"],
        "autocwm_s": times["AutoCWM"],
        "ratio": ratio,
        "ratio_over_K": ratio / components,
    }


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(
        prog="python -m inference.bench.vi",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--guides", default="AutoNormal,AutoMVN,AutoIAFNormal,AutoCWM,AutoCWM:flow")
    p.add_argument("--components", type=int, default=8)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--samples", type=int, default=4000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench-out/vi.json")
    p.add_argument(
        "--step-cost",
        action="store_true",
        help="only time SVI steps on eight schools for K = 2, 4, 8, 16",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.step_cost:
        for k in (2, 4, 8, 16):
            print(json.dumps(step_cost(k)), flush=True)
        return []
    rows = [run(t, g, args) for t in args.targets.split(",") for g in args.guides.split(",")]
    print(
        f"\nsteps {args.steps}, lr {args.lr}, K {args.components}, samples {args.samples}, "
        f"torch threads {torch.get_num_threads()}"
    )
    cols = [
        "elbo",
        "log_z_error",
        "kl",
        "k_hat",
        "energy",
        "mean_err",
        "sd_ratio",
        "mode_err",
        "time_s",
    ]
    print(f"{'target':18s} {'guide':16s} " + " ".join(f"{c:>10s}" for c in cols))
    for r in rows:
        print(f"{r['target']:18s} {r['guide']:16s} " + " ".join(f"{r[c]:10.4f}" for c in cols))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
