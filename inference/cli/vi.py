"""``pyro-cwm vi FILE.py:MODEL``: AutoNormal against AutoCWM on your own Pyro model.

Loads ``MODEL`` (a Pyro model, a callable) from the Python file, and its positional
arguments from ``--args NAME`` (a tuple in the same file, or a function returning one),
fits both guides as ``pyro-cwm demo`` does, prints the ArviZ summaries and the table
(ELBO, IS log Z, PSIS k-hat, time) and writes the InferenceData (NetCDF), the loss curves,
a scatter of the first two posterior coordinates of both guides and the table (JSON).

Discrete sites marked for parallel enumeration (``config_enumerate``, a mixture's
assignments) are found from a trace of the model and summed out: AutoNormal sees the model
with them hidden and trains with ``TraceEnum_ELBO``; AutoCWM sums them out itself.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import arviz as az
import numpy as np
import torch

from inference.cli.data_files import parse_device
from inference.cli.demo import add_svi_arguments, check_svi_arguments, fit_guide
from inference.cli.errors import CLIError
from pyro_cwm.guides.log_joint import enumerated_sites


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "vi",
        help="AutoNormal against AutoCWM on a Pyro model in a Python file",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument("target", metavar="FILE.py:MODEL", help="the file and the model's name")
    p.add_argument("--args", metavar="NAME",
                   help="a tuple (or a function returning one) in FILE: the model's arguments")
    add_svi_arguments(p)
    p.add_argument("--out", default="runs/vi", help="output folder")
    p.set_defaults(run=run)


def load_model(target: str, args_name: str | None) -> tuple:
    """``(model, args)`` from ``FILE.py:MODEL`` and the optional arguments' name."""
    path, _, name = target.rpartition(":")
    if not path or not name:
        raise CLIError(f"expected FILE.py:MODEL, got {target!r}")
    if not Path(path).is_file():
        raise CLIError(f"FILE.py:MODEL: no such file {path!r}")
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # the user's file: report it, whatever it raised
        raise CLIError(f"importing {path} failed: {type(error).__name__}: {error}") from None
    model = getattr(module, name, None)
    if not callable(model):
        raise CLIError(f"{path} has no callable {name!r}")
    model_args: tuple = ()
    if args_name is not None:
        value = getattr(module, args_name, None)
        if value is None:
            raise CLIError(f"--args: {path} has no {args_name!r}")
        value = value() if callable(value) else value
        if not isinstance(value, tuple | list):
            raise CLIError(f"--args: {args_name!r} must be a tuple of the model's arguments")
        model_args = tuple(value)
    return model, model_args


def _flat(idata: az.InferenceData) -> np.ndarray:
    columns = [
        idata.posterior[v].values.reshape(-1, int(np.prod(idata.posterior[v].shape[2:])))
        for v in idata.posterior.data_vars
    ]
    return np.concatenate(columns, axis=1)


def run(args: argparse.Namespace) -> int:
    check_svi_arguments(args)
    device = parse_device(args.device)
    model, model_args = load_model(args.target, args.args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, fits, written = [], {}, []
    with torch.device(device):
        try:
            # Discrete sites marked for enumeration (a mixture's assignments) are summed
            # out: hidden from AutoNormal, which then trains with TraceEnum_ELBO.
            enumerated = enumerated_sites(model, *model_args)
        except Exception as error:  # the user's model: report it, whatever it raised
            raise CLIError(f"running {args.target} failed: {type(error).__name__}: "
                           f"{error}") from None
        if enumerated:
            print(f"vi: enumerated sites {', '.join(enumerated)} are summed out "
                  "(AutoNormal: hidden, TraceEnum_ELBO)")
        for guide in ("AutoNormal", "AutoCWM"):
            try:
                row, idata, losses = fit_guide(model, model_args, guide, args, enumerated)
            except (ValueError, TypeError) as error:
                raise CLIError(f"{guide}: {error}") from None
            rows.append(row)
            fits[guide] = (idata, losses)
            idata.to_netcdf(out / f"{guide}.nc")
            written.append(f"{guide}.nc")
            print(f"\n{guide}: ArviZ summary")
            print(az.summary(idata, kind="stats").to_string())
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for guide, (idata, losses) in fits.items():
        axes[0].plot(losses, label=guide, lw=0.8)
        flat = _flat(idata)
        if flat.shape[1] >= 2:
            axes[1].scatter(flat[:, 0], flat[:, 1], s=2, alpha=0.3, label=guide)
        else:
            axes[1].hist(flat[:, 0], bins=60, alpha=0.5, density=True, label=guide)
    axes[0].set_yscale("symlog")
    axes[0].set_xlabel("step")
    axes[0].set_title("SVI loss")
    axes[1].set_title("first two posterior coordinates (unconstrained order)")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "vi.png", dpi=90)
    plt.close(fig)
    (out / "table.json").write_text(json.dumps(rows, indent=1))
    print("\n| guide | ELBO | IS log Z | k-hat | s |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['guide']} | {r['elbo']:.3f} | {r['is_log_z']:.3f} | {r['k_hat']:.2f} | "
              f"{r['time_s']:.1f} |")
    print(f"\nvi: wrote {', '.join(written + ['vi.png', 'table.json'])} to {out}")
    return 0
