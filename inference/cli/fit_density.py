"""``pyro-cwm fit-density``: fit a CWM to a data file or a built-in example."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from inference.cli.data_files import add_data_arguments, parse_device, read_data
from inference.cli.errors import CLIError
from inference.density import fit_density
from inference.diagnostics.plots import plot_density
from pyro_cwm.nn.cwm import CWM
from pyro_cwm.nn.maps import MAPS


def _int_tuple(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"widths must be positive, got {text!r}")
    return values


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "fit-density",
        help="fit a CWM to data by maximum likelihood",
        description="Fit a Classifier Weighted Mixture to the rows of a CSV or .npy file (or a "
        "built-in example) and write the model, a JSON report and, for 1-D/2-D data, a PNG.",
    )
    add_data_arguments(p)
    p.add_argument(
        "--context-columns",
        type=int,
        default=0,
        help="the last C columns are a context: fit p(x | context)",
    )
    p.add_argument("-k", "--components", type=int, default=10, help="number of components K")
    p.add_argument(
        "--hidden", type=_int_tuple, default=(64, 64), help="classifier widths, e.g. 64,64"
    )
    p.add_argument("--map", choices=sorted(MAPS), default="location_scale", help="invertible maps")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--validation", type=float, default=0.1, help="held-out fraction")
    p.add_argument("--patience", type=int, default=20, help="early-stopping patience in epochs")
    p.add_argument("--no-em", action="store_true", help="skip EM pretraining")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--float64", action="store_true", help="compute in double precision")
    p.add_argument("--out", default="runs/fit-density", help="output folder")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.components < 1:
        raise CLIError(f"--components must be >= 1, got {args.components}")
    table = read_data(args)
    c = args.context_columns
    if c < 0 or c >= table.shape[1]:
        raise CLIError(f"--context-columns must be in [0, {table.shape[1] - 1}], got {c}")
    if args.components > table.shape[0]:
        raise CLIError(
            f"--components ({args.components}) exceeds the number of points ({table.shape[0]})"
        )
    device = parse_device(args.device)
    dtype = torch.float64 if args.float64 else torch.float32
    tensor = torch.as_tensor(table, dtype=dtype, device=device)
    data = tensor[:, : tensor.shape[1] - c]
    context = tensor[:, tensor.shape[1] - c :] if c else None

    torch.manual_seed(args.seed)
    cwm = CWM(data.shape[1], args.components, hidden_dims=args.hidden, map=args.map, context_dim=c)
    started = time.perf_counter()
    try:
        history = fit_density(
            cwm,
            data,
            context,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            validation=args.validation,
            patience=args.patience,
            em_pretraining=not args.no_em,
            seed=args.seed,
            progress=not args.no_progress,
        )
    except (ValueError, TypeError) as error:
        raise CLIError(str(error)) from None
    elapsed = time.perf_counter() - started

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"config": cwm.config(), "state_dict": cwm.state_dict()}, out / "model.pt")
    with torch.no_grad():
        nll = -cwm(context).log_prob(data).mean().item()
    report = {
        "command": "fit-density",
        "data": args.example or str(args.data),
        "num_points": int(data.shape[0]),
        "dim": int(data.shape[1]),
        "context_dim": c,
        "config": cwm.config(),
        "num_parameters": sum(p.numel() for p in cwm.parameters()),
        "nll_per_point_all_data": nll,
        "best_held_out_nll": history["best_val_nll"] if history["val_nll"] else None,
        "best_epoch": history["best_epoch"],
        "epochs": history["epochs"],
        "stopped_early": history["stopped_early"],
        "train_nll": history["train_nll"],
        "val_nll": history["val_nll"],
        "time_s": elapsed,
        "device": str(device),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    written = ["model.pt", "report.json"]
    if data.shape[1] <= 2:
        samples = cwm(context).sample() if c else None
        plot_density(None if c else cwm(), data, out / "density.png", samples=samples)
        written.append("density.png")
    held = report["best_held_out_nll"]
    print(
        f"fit-density: {report['num_parameters']} parameters, NLL/point {nll:.4f}"
        + (f", held-out {held:.4f}" if held is not None else "")
        + f", {history['epochs']} epochs in {elapsed:.1f}s; wrote {', '.join(written)} to {out}"
    )
    return 0
