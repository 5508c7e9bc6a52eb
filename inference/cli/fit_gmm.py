"""``pyro-cwm fit-gmm``: fit a Gaussian mixture by EM, optionally choosing K by BIC.

Under ``torchrun`` (``torchrun --nproc_per_node=P -m inference.cli fit-gmm ...``) the
processes share the EM work: each fits on its share of the rows
([`GaussianMixtureEM`][inference.GaussianMixtureEM] sums the statistics across them), all
hold the same fit, and rank 0 writes the outputs.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning

from inference.cli.data_files import add_data_arguments, parse_device, read_data
from inference.cli.errors import CLIError
from inference.diagnostics.plots import plot_gaussian_mixture
from inference.em.distributed import process_group_from_environment, rank_and_size, shard_bounds
from inference.em.estimator import INIT_PARAMS, GaussianMixtureEM
from pyro_cwm.distributions.gaussian_mixture import COVARIANCE_TYPES


def k_range(text: str) -> list[int]:
    """``"1..20"`` or ``"2,4,8"`` as a sorted list of positive ints."""
    try:
        if ".." in text:
            low, high = (int(v) for v in text.split(".."))
            values = list(range(low, high + 1))
        else:
            values = sorted({int(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected A..B or a comma list, got {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"K values must be >= 1, got {text!r}")
    return values


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "fit-gmm",
        help="fit a Gaussian mixture by EM (scikit-learn's API on torch)",
        description="Fit a Gaussian mixture by EM to the rows of a CSV or .npy file (or a "
        "built-in example), optionally choosing K by BIC, and write a JSON report, the "
        "labels and, for 2-D data, a plot of the fitted ellipses. Under torchrun the "
        "processes split the rows and rank 0 writes the outputs.",
    )
    add_data_arguments(p)
    p.add_argument("-k", "--components", type=int, default=5, help="number of components K")
    p.add_argument(
        "--select-k",
        type=k_range,
        metavar="A..B",
        help="fit every K in this range (or comma list) and keep the lowest BIC",
    )
    p.add_argument("--covariance-type", choices=COVARIANCE_TYPES, default="full")
    p.add_argument("--n-init", type=int, default=1, help="starts per K (best lower bound)")
    p.add_argument("--init-params", choices=INIT_PARAMS, default="kmeans")
    p.add_argument("--max-iter", type=int, default=100)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--reg-covar", type=float, default=1e-6)
    p.add_argument("--constant-variance", type=float, default=1.0, help="for 'constant'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--device", default="cpu", help="cpu, cuda or cuda:N (under torchrun, cuda: LOCAL_RANK)"
    )
    p.add_argument("--float32", action="store_true", help="compute in single precision")
    p.add_argument("--out", default="runs/fit-gmm", help="output folder")
    p.set_defaults(run=run)


def _fit(
    table: np.ndarray, k: int, args: argparse.Namespace, device: torch.device
) -> GaussianMixtureEM:
    model = GaussianMixtureEM(
        k,
        covariance_type=args.covariance_type,
        n_init=args.n_init,
        init_params=args.init_params,
        max_iter=args.max_iter,
        tol=args.tol,
        reg_covar=args.reg_covar,
        constant_variance=args.constant_variance,
        random_state=args.seed,
        device=device,
        dtype=torch.float32 if args.float32 else torch.float64,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # reported as "converged"
        return model.fit(table)


def run(args: argparse.Namespace) -> int:
    table = read_data(args)
    device = parse_device(args.device)
    candidates = args.select_k or [args.components]
    if candidates[-1] > table.shape[0]:
        raise CLIError(f"K ({candidates[-1]}) exceeds the number of points ({table.shape[0]})")
    with process_group_from_environment(device) as device:
        return _run(args, table, candidates, device)


def _run(
    args: argparse.Namespace, table: np.ndarray, candidates: list[int], device: torch.device
) -> int:
    rank, size = rank_and_size()
    start, stop = shard_bounds(table.shape[0])
    if stop - start < 2:
        raise CLIError(f"{size} processes need at least {2 * size} points, got {table.shape[0]}")
    started = time.perf_counter()
    scores, best, best_bic = [], None, np.inf
    for k in candidates:
        try:
            # This process's rows; the scores below are of every row (same on every rank).
            model = _fit(table[start:stop], k, args, device)
        except ValueError as error:
            raise CLIError(f"K={k}: {error}") from None
        bic, aic = model.bic(table), model.aic(table)
        scores.append(
            {"k": k, "bic": bic, "aic": aic, "mean_log_likelihood": model.score(table),
             "converged": bool(model.converged_), "n_iter": int(model.n_iter_)}
        )
        if bic < best_bic:
            best, best_bic = model, bic
    elapsed = time.perf_counter() - started
    if rank != 0:
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    labels = best.predict(table)
    np.savetxt(out / "labels.csv", labels, fmt="%d")
    report = {
        "command": "fit-gmm",
        "data": args.example or str(args.data),
        "num_points": int(table.shape[0]),
        "dim": int(table.shape[1]),
        "covariance_type": args.covariance_type,
        "k": int(best.n_components),
        "selection": "bic" if args.select_k else None,
        "scores": scores,
        "mean_log_likelihood": best.score(table),
        "bic": best.bic(table),
        "aic": best.aic(table),
        "converged": bool(best.converged_),
        "n_iter": int(best.n_iter_),
        "weights": best.weights_.tolist(),
        "means": best.means_.tolist(),
        "covariances": np.asarray(best.covariances_).tolist(),
        "time_s": elapsed,
        "device": str(device),
        "processes": size,
    }
    (out / "report.json").write_text(json.dumps(report, indent=2))
    written = ["report.json", "labels.csv"]
    if table.shape[1] == 2:
        dense = best.distribution().component_covariances
        plot_gaussian_mixture(
            table, best.weights_, best.means_, dense, out / "gmm.png", labels=labels
        )
        written.append("gmm.png")
    chosen = f" (chosen by BIC among {candidates[0]}..{candidates[-1]})" if args.select_k else ""
    print(
        f"fit-gmm: K={best.n_components}{chosen}, {args.covariance_type} covariances, "
        f"mean log-likelihood {report['mean_log_likelihood']:.4f}, BIC {report['bic']:.1f}, "
        f"{elapsed:.1f}s; wrote {', '.join(written)} to {out}"
    )
    return 0
