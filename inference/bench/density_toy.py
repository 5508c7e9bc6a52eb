"""The 2-D toy suite of the density benchmark: six targets with exact densities.

For every toy of [`TOY_DENSITIES`][pyro_cwm.data.TOY_DENSITIES]: draw training and held-out
points from its exact sampler, fit every model on the same training loop, and report the
held-out NLL, its gap to the exact density's NLL on the same points (an estimate of the
entropy, the best any model can do), parameters, seconds per epoch and the epoch of the best
validation NLL. Three CWM fits from one EM start split the CWM's gain over it: maps and
classifier trained (``cwm``), classifier only (``cwm [maps frozen]``), maps only
(``cwm [classifier frozen]``). One PNG per toy shows the true density beside every model's.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from inference.bench.density_models import Fitted, Options, fit_em, fit_gradient, mean_nll
from pyro_cwm.data import TOY_DENSITIES, ToyDensity

DEFAULT_MODELS = (
    "gmm,cwm,cwm-s,cwm-affine,cwm-flow,realnvp-s,realnvp-l,nsf-s,nsf-l,maf-s,maf-l,cwm-split"
)


def fit_toy(
    toy: ToyDensity, models: list[str], options: Options, num_train: int, num_test: int
) -> tuple[list[dict], dict[str, Fitted], float]:
    """Fit ``models`` to one toy; returns the rows, the fits and the exact held-out NLL."""
    train = toy.sample(num_train, seed=options.seed)
    test = toy.sample(num_test, seed=options.seed + 1)
    exact = mean_nll(lambda x: toy.log_prob(x.double()), test)
    fits: dict[str, Fitted] = {}
    for name in models:
        if name == "gmm":
            fits[name] = fit_em(train, test, options)
        elif name == "cwm-split":
            fits["cwm [maps frozen]"] = fit_gradient(
                "cwm", train, test, options, freeze="maps", label="cwm [maps frozen]"
            )
            fits["cwm [classifier frozen]"] = fit_gradient(
                "cwm", train, test, options, freeze="classifier", label="cwm [classifier frozen]"
            )
        else:
            fits[name] = fit_gradient(name, train, test, options)
    rows = []
    for fit in fits.values():
        row = {"toy": toy.name, **fit.row, "exact_nll": exact, "gap": fit.row["nll"] - exact}
        rows.append(row)
        print(format_row(row), flush=True)
    return rows, fits, exact


def classifier_share(rows: list[dict]) -> dict | None:
    """The CWM's gain over its EM start and the parts the classifier and the maps bring alone."""
    by = {r["model"]: r for r in rows}
    if not {"cwm", "cwm [maps frozen]", "cwm [classifier frozen]"} <= set(by):
        return None
    start = by["cwm"]["nll_em_start"]
    both = start - by["cwm"]["nll"]
    alone = start - by["cwm [maps frozen]"]["nll"]
    maps = start - by["cwm [classifier frozen]"]["nll"]
    return {
        "toy": rows[0]["toy"],
        "em_start_nll": start,
        "gain_both": both,
        "gain_classifier_only": alone,
        "gain_maps_only": maps,
        "classifier_share": alone / both if both > 0 else math.nan,
    }


def format_row(r: dict) -> str:
    return (
        f"{r['toy']:12s} {r['model']:24s} {r['parameters']:8d} {r['nll']:8.4f} {r['gap']:7.4f} "
        f"{r['s_per_epoch']:8.3f} {r['best_epoch']:5d}/{r['epochs']:<4d}"
    )


HEADER = (
    f"{'toy':12s} {'model':24s} {'params':>8s} {'NLL':>8s} {'gap':>7s} {'s/epoch':>8s} "
    f"{'best/run':>10s}"
)


def plot_toy(toy: ToyDensity, fits: dict[str, Fitted], path: Path, grid: int = 120) -> None:
    """A grid of panels: the true density, then every model's, on the toy's window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    low, high = toy.bounds
    axis = torch.linspace(low, high, grid)
    points = torch.cartesian_prod(axis, axis)
    panels = [("true", lambda x: toy.log_prob(x.double()).float())]
    panels += [(name, fit.log_prob) for name, fit in fits.items()]
    cols = min(len(panels), 7)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.4 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (name, log_prob) in zip(axes.flat, panels):
        with torch.no_grad():
            dens = torch.cat([log_prob(c) for c in points.split(4096)]).exp()
        ax.imshow(
            dens.reshape(grid, grid).T.numpy(),
            origin="lower",
            extent=(low, high, low, high),
            cmap="viridis",
        )
        ax.set_title(name, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(args) -> dict:
    """The toy suite for parsed command-line ``args`` (see ``inference.bench.density``)."""
    options = Options.from_args(args, components=16, epochs=40, batch_size=512, lr=3e-3)
    models = (args.models or DEFAULT_MODELS).split(",")
    toys = args.toys.split(",") if args.toys else list(TOY_DENSITIES)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows, shares = [], []
    print(HEADER, flush=True)
    for name in toys:
        toy = TOY_DENSITIES[name]
        toy_rows, fits, _ = fit_toy(toy, models, options, args.num_train, args.num_test)
        rows += toy_rows
        share = classifier_share(toy_rows)
        if share is not None:
            shares.append(share)
        if not args.no_plots:
            plot_toy(toy, fits, out / f"toy-{name}.png")
    summary(rows, shares)
    elapsed = time.perf_counter() - started
    print(
        f"\n{len(toys)} toys, train {args.num_train}, test {args.num_test}, "
        f"K {options.components}, epochs {options.epochs}, batch {options.batch_size}, "
        f"lr {options.lr}, classifier lr {options.classifier_lr or 10 * options.lr:g}, "
        f"torch threads {torch.get_num_threads()}, total {elapsed:.0f} s"
    )
    return {"options": vars(options), "rows": rows, "classifier_share": shares}


def summary(rows: list[dict], shares: list[dict]) -> None:
    """Print the per-toy summary: CWM against the EM GMM and NSF, and the classifier's share."""
    if shares:
        print(
            f"\n{'toy':12s} {'EM start':>9s} {'gain both':>10s} {'classifier':>11s} "
            f"{'maps':>8s} {'share':>6s}"
        )
        for s in shares:
            print(
                f"{s['toy']:12s} {s['em_start_nll']:9.4f} {s['gain_both']:10.4f} "
                f"{s['gain_classifier_only']:11.4f} {s['gain_maps_only']:8.4f} "
                f"{s['classifier_share']:6.2f}"
            )
    best: dict[str, dict] = {}
    for r in rows:
        best.setdefault(r["toy"], {})[r["model"]] = r
    print(
        f"\n{'toy':12s} {'exact':>7s} {'GMM':>7s} {'CWM':>7s} {'CWM-GMM':>8s} "
        f"{'best NSF':>16s} {'best CWM <= NSF/5 params':>26s} {'vs NSF':>7s}"
    )
    for toy, by in best.items():
        nsfs = [r for m, r in by.items() if m.startswith("nsf")]
        gmm = by.get("gmm-diag (EM)", {}).get("nll", math.nan)
        cwm = by.get("cwm", {}).get("nll", math.nan)
        if not nsfs:
            continue
        n = min(nsfs, key=lambda r: r["nll"])
        small = [
            r
            for m, r in by.items()
            if m.startswith("cwm") and "[" not in m and 5 * r["parameters"] <= n["parameters"]
        ]
        c = min(small, key=lambda r: r["nll"]) if small else None
        cwm_text = f"{c['nll']:7.4f} {c['model']:>10s} {c['parameters']:7d}" if c else "-"
        diff = f"{c['nll'] - n['nll']:+7.4f}" if c else "-"
        print(
            f"{toy:12s} {n['exact_nll']:7.4f} {gmm:7.4f} {cwm:7.4f} {cwm - gmm:+8.4f} "
            f"{n['nll']:7.4f} {n['model']:>8s} {cwm_text:>26s} {diff:>7s}"
        )
