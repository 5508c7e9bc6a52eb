"""``pyro-cwm demo``: AutoNormal against AutoCWM on posteriors a Gaussian guide gets wrong.

Two built-in targets with exact samplers (so the reference is exact and log Z = 0): a ring
of 8 Gaussians (multimodal, 2-D) and Neal's funnel (10-D). For each target both guides are
fitted by SVI (AutoCWM's default maps: its start finds the ring's modes and gives it
location-scale components, and finds no mode in the funnel's neck and gives it an
autoregressive affine flow after them; ``--map`` sets them); the command prints an ArviZ
summary of each fit and a comparison table (ELBO, IS log Z, KL = log Z - ELBO, PSIS k-hat,
energy distance to exact draws, time), and writes to ``--out``: the InferenceData of every
fit (NetCDF), a pair plot of both approximations against the exact draws per target, the
loss curves and the table (JSON).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import arviz as az
import pyro
import pyro.poutine as poutine
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from pyro.infer.autoguide import AutoNormal

from inference.cli.data_files import parse_device
from inference.cli.errors import CLIError
from inference.diagnostics.inference_data import to_inference_data
from inference.diagnostics.metrics import energy_distance
from inference.diagnostics.psis import psis_diagnostic
from inference.svi import fit_svi
from inference.svi.elbo import CWMELBO
from pyro_cwm.data.targets import TARGETS
from pyro_cwm.guides import AutoCWM
from pyro_cwm.guides.log_joint import max_plate_nesting
from pyro_cwm.nn import MAP_CHOICES, map_arguments

DEMO_TARGETS = ("ring", "funnel")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="AutoNormal against AutoCWM on a multimodal posterior and a funnel",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument("--targets", default=",".join(DEMO_TARGETS),
                   help=f"comma list of built-in targets (of {', '.join(sorted(TARGETS))})")
    add_svi_arguments(p)
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.set_defaults(run=run)


def _optim(steps: int, lr: float) -> pyro.optim.PyroOptim:
    hold = 2 * steps // 3

    def factor(step: int) -> float:
        return 1.0 if step < hold else 0.1 ** ((step - hold) / max(1, steps - hold))

    return pyro.optim.LambdaLR(
        {"optimizer": torch.optim.Adam, "optim_args": {"lr": lr}, "lr_lambda": factor}
    )


def fit_guide(
    model, model_args: tuple, name: str, args, enumerated: Sequence[str] = ()
) -> tuple[dict, az.InferenceData, list]:
    """Fit ``name`` (AutoNormal or AutoCWM) to ``model(*model_args)``; diagnose it.

    Returns the table row (ELBO, IS log Z, k-hat, time), the InferenceData and the losses.
    ``args`` carries ``steps``, ``lr``, ``components``, ``map``, ``samples``, ``seed``,
    ``no_progress``. ``enumerated`` names the model's discrete sites marked for parallel
    enumeration (``config_enumerate``): AutoNormal then sees the model with them hidden
    and trains with ``TraceEnum_ELBO``, which sums them out (AutoCWM and ``CWMELBO`` sum
    them out on their own).
    """
    pyro.clear_param_store()
    pyro.set_rng_seed(args.seed)
    map_name = None if name == "AutoNormal" else args.map
    if name == "AutoNormal" and enumerated:
        guide = AutoNormal(poutine.block(model, hide=list(enumerated)))
        loss = TraceEnum_ELBO(
            num_particles=4,
            vectorize_particles=True,
            max_plate_nesting=max_plate_nesting(model, *model_args),
        )
    elif name == "AutoNormal":
        guide, loss = AutoNormal(model), Trace_ELBO(num_particles=4, vectorize_particles=True)
    else:
        guide = AutoCWM(model, num_components=args.components, **map_arguments(map_name))
        loss = CWMELBO(num_particles=4)
    started = time.perf_counter()
    history = fit_svi(model, guide, *model_args, loss=loss, num_steps=args.steps,
                      optim=_optim(args.steps, args.lr), progress=not args.no_progress)
    elapsed = time.perf_counter() - started
    diagnostic = psis_diagnostic(model, guide, *model_args, num_samples=args.samples,
                                 seed=args.seed)
    idata = to_inference_data(model, guide, *model_args, num_samples=args.samples,
                              seed=args.seed)
    chosen = guide.map_chosen if isinstance(guide, AutoCWM) else None
    row = {"guide": name, "map": chosen, "elbo": diagnostic.elbo,
           "is_log_z": diagnostic.log_z, "k_hat": diagnostic.k_hat, "time_s": elapsed}
    return row, idata, history["loss"]


def _fit(target, name: str, args) -> tuple[dict, az.InferenceData, list[float]]:
    row, idata, losses = fit_guide(target.model, (), name, args)
    draws = torch.as_tensor(idata.posterior["x"].values).reshape(-1, target.dim)
    reference = target.sample(args.samples, torch.Generator().manual_seed(args.seed))
    row = {
        "target": target.name,
        **row,
        "kl": 0.0 - row["elbo"],
        "energy_distance": energy_distance(draws.float().cpu(), reference.float().cpu()),
    }
    return row, idata, losses


def add_svi_arguments(p: argparse.ArgumentParser) -> None:
    """The options ``fit_guide`` reads, shared by ``demo`` and ``vi``."""
    p.add_argument("--steps", type=int, default=1500, help="SVI steps per guide")
    p.add_argument("--components", type=int, default=8, help="K of AutoCWM")
    p.add_argument("--map", choices=MAP_CHOICES, default=None,
                   help="AutoCWM's component maps: location_scale (diagonal), affine (full "
                   "covariance), flow (a spline flow), maf (an autoregressive affine flow "
                   "per component; slower) or iaf (one such flow after the components, "
                   "shared). Default: AutoCWM's own choice, location_scale where its start "
                   "finds a mode, iaf where it finds none (a funnel)")
    p.add_argument("--lr", type=float, default=0.01, help="Adam step size (decays 10x "
                   "over the last third of the steps)")
    p.add_argument("--samples", type=int, default=2000,
                   help="draws for the diagnostics, the InferenceData and the plots")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def check_svi_arguments(args: argparse.Namespace) -> None:
    for option in ("steps", "components", "samples"):
        if getattr(args, option) < (10 if option == "samples" else 1):
            raise CLIError(f"--{option} is too small: {getattr(args, option)}")


def _plots(key: str, target, fits: dict, args, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reference = target.sample(args.samples, torch.Generator().manual_seed(args.seed)).cpu()
    fig, axes = plt.subplots(1, 1 + len(fits), figsize=(4.5 * (1 + len(fits)), 4.2),
                             sharex=True, sharey=True)
    panels = [("exact draws", reference)] + [
        (name, torch.as_tensor(idata.posterior["x"].values).reshape(-1, target.dim))
        for name, (_, idata, _) in fits.items()
    ]
    for ax, (title, draws) in zip(axes, panels):
        ax.scatter(draws[:, 0], draws[:, 1], s=2, alpha=0.4)
        ax.set_title(f"{target.name}: {title}")
        ax.set_xlabel("x[0]")
    axes[0].set_ylabel("x[1]")
    fig.tight_layout()
    fig.savefig(out / f"pairs_{key}.png", dpi=90)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (_, _, losses) in fits.items():
        ax.plot(losses, label=name, lw=0.8)
    ax.set_yscale("symlog")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (-ELBO estimate)")
    ax.set_title(f"{target.name}: SVI loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"loss_{key}.png", dpi=90)
    plt.close(fig)
    return [f"pairs_{key}.png", f"loss_{key}.png"]


def run(args: argparse.Namespace) -> int:
    names = [t for t in args.targets.split(",") if t]
    unknown = [t for t in names if t not in TARGETS]
    if unknown or not names:
        raise CLIError(f"--targets: unknown {unknown or names}; choose from {sorted(TARGETS)}")
    check_svi_arguments(args)
    device = parse_device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, written = [], []
    with torch.device(device):
        for name in names:
            target = TARGETS[name]()
            fits = {}
            for guide in ("AutoNormal", "AutoCWM"):
                row, idata, losses = _fit(target, guide, args)
                fits[guide] = (row, idata, losses)
                rows.append(row)
                idata.to_netcdf(out / f"{name}_{guide}.nc")
                written.append(f"{name}_{guide}.nc")
                print(f"\n{name}, {guide}: ArviZ summary")
                print(az.summary(idata, var_names=["x"], kind="stats").to_string())
            written += _plots(name, target, fits, args, out)
    (out / "table.json").write_text(json.dumps(rows, indent=1))
    print("\n| target | guide | ELBO | IS log Z | KL(q||p) | k-hat | energy | s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        guide = r["guide"] + (f" ({r['map']})" if r["map"] else "")
        print(f"| {r['target']} | {guide} | {r['elbo']:.3f} | {r['is_log_z']:.3f} | "
              f"{r['kl']:.3f} | {r['k_hat']:.2f} | {r['energy_distance']:.3f} | "
              f"{r['time_s']:.1f} |")
    print(f"\ndemo: wrote {', '.join(written + ['table.json'])} to {out}")
    return 0
