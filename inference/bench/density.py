"""Density benchmarks: CWM against zuko's flows and EM-fitted Gaussian mixtures.

Four suites. ``--suite toy`` (see `inference.bench.density_toy`): the six 2-D
toy densities of the flow literature, with exact densities, every model on the same
training loop, a PNG per toy, and the split of the CWM's gain between classifier and maps.

    python -m inference.bench.density --suite toy        # about 15 min on 2 cores

``--suite digits`` (see `inference.bench.density_digits`): the 64-dim
dequantized 8x8 digits in bits per dimension, beside FlowGMM's 2.29. ``--suite step``
(see `inference.bench.density_step`): a training step of each model, timed, and the CWM
classifier's flops against this CPU's matrix-product peak.

``--suite image`` (the default) reproduces the comparison of the CWM paper on an image
shipped with scikit-learn: the greyscale image is a density on [0, 1]^2, uniform inside
each pixel with mass proportional to its intensity; points are mapped to R^2 by
``logit(a + (1 - 2a) x)`` (a = 0.01) and every model is fitted there. The table gives
held-out NLL per point in the logit space (the paper's figure) and in the image space,
parameter counts and times.

    python -m inference.bench.density                    # the full run (about 15 min, 2 cores)
    python -m inference.bench.density --epochs 2 --num-train 5000   # a quick look

Needs the ``bench`` extra (scikit-learn and pillow).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import zuko

from inference.density import fit_density
from inference.em.estimator import GaussianMixtureEM
from pyro_cwm import CWM
from pyro_cwm.data.images import LogitTransform, pixel_density_sample


def greyscale_image(name: str) -> np.ndarray:
    from sklearn.datasets import load_sample_image

    rgb = load_sample_image(name).astype(np.float64)
    return rgb[..., :3] @ np.array([0.2989, 0.5870, 0.1140])


def num_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m inference.bench.density",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--suite", choices=("image", "toy", "digits", "step"), default="image")
    p.add_argument("--image", default="china.jpg", help="scikit-learn sample image")
    p.add_argument("--toys", default=None, help="comma-separated toys (default: all six)")
    p.add_argument("--num-train", type=int, default=None, help="image 100000, toy 10000")
    p.add_argument("--num-test", type=int, default=None, help="image 50000, toy 5000")
    p.add_argument("--epochs", type=int, default=None, help="image 30, toy 40")
    p.add_argument("--batch-size", type=int, default=None, help="image 1000, toy 512")
    p.add_argument("--lr", type=float, default=None, help="Adam's learning rate (3e-3)")
    p.add_argument(
        "--classifier-lr", type=float, default=None, help="a CWM classifier's lr (10 x lr)"
    )
    p.add_argument("--patience", type=int, default=8, help="early stopping (toy suite)")
    p.add_argument("--components", type=int, default=None, help="K: image 50, toy 16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", default=None, help="comma-separated models (default: all)")
    p.add_argument("--no-plots", action="store_true", help="toy suite: skip the PNGs")
    p.add_argument("--out", default="bench-out/density", help="folder for the JSON and PNG")
    args = p.parse_args(argv)
    sizes = {"image": (100_000, 50_000), "toy": (10_000, 5_000), "digits": (5_748, 0)}
    defaults = sizes.get(args.suite, (0, 0))
    args.num_train = args.num_train or defaults[0]
    args.num_test = args.num_test or defaults[1]
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.suite == "toy":
        from inference.bench import density_toy

        report = density_toy.run(args)
        out = Path(args.out)
        (out / "toy.json").write_text(json.dumps({"args": vars(args), **report}, indent=2))
        return report["rows"]
    if args.suite in ("digits", "step"):
        from inference.bench import density_digits, density_step

        suite = {"digits": density_digits, "step": density_step}[args.suite]
        report = suite.run(args)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        text = json.dumps({"args": vars(args), **report}, indent=2)
        (out / f"{args.suite}.json").write_text(text)
        return report["rows"]
    args.epochs = args.epochs or 30
    args.batch_size = args.batch_size or 1000
    args.lr = args.lr or 3e-3
    args.components = args.components or 50
    args.models = args.models or "cwm,realnvp,nsf,gmm-full,gmm-diag"
    device = torch.device(args.device)
    grey = greyscale_image(args.image)
    logit = LogitTransform(0.01)
    train_img = pixel_density_sample(grey, args.num_train, seed=args.seed).double()
    test_img = pixel_density_sample(grey, args.num_test, seed=args.seed + 1).double()
    train = logit(train_img).float().to(device)
    test = logit(test_img).float().to(device)
    # log p_image(x) = log p_logit(y) + log|dy/dx|: the mean change of NLL between spaces.
    log_det = logit.log_abs_det_jacobian(test_img, logit(test_img)).sum(-1).mean().item()

    K = args.components
    wanted = args.models.split(",")
    torch.manual_seed(args.seed)
    flows = {
        "cwm": CWM(2, K, hidden_dims=(128, 128, 128)),
        "realnvp": zuko.flows.RealNVP(2, transforms=5, hidden_features=(256, 256)),
        "nsf": zuko.flows.NSF(2, transforms=5, hidden_features=(256, 256), bins=8),
    }
    rows = []
    for name, model in flows.items():
        if name not in wanted:
            continue
        print(f"training {name} ({num_parameters(model)} parameters)", flush=True)
        history = fit_density(
            model,
            train,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            classifier_lr=args.classifier_lr if name == "cwm" else None,
            validation=0.05,
            patience=None,
            seed=args.seed,
        )
        with torch.no_grad():
            nll = -torch.cat([model().log_prob(c) for c in test.split(10_000)]).mean().item()
        rows.append(
            {
                "model": name,
                "parameters": num_parameters(model),
                "nll_logit": nll,
                "epochs": history["epochs"],
                "time_s": history["time_s"],
                "s_per_epoch": history["time_s"] / history["epochs"],
            }
        )
        print(rows[-1], flush=True)

    if "gmm-full" in wanted:
        from sklearn.mixture import GaussianMixture

        started = time.perf_counter()
        gmm = GaussianMixture(K, covariance_type="full", random_state=args.seed, max_iter=200)
        gmm.fit(train.cpu().numpy())
        rows.append(
            {
                "model": "gmm-full (scikit-learn EM)",
                "parameters": K * (2 + 3) + K - 1,
                "nll_logit": -gmm.score(test.cpu().numpy()),
                "epochs": int(gmm.n_iter_),
                "time_s": time.perf_counter() - started,
                "s_per_epoch": None,
            }
        )
        print(rows[-1], flush=True)
    if "gmm-diag" in wanted:
        started = time.perf_counter()
        fit = GaussianMixtureEM(
            K, covariance_type="diag", max_iter=200, tol=1e-6, random_state=args.seed
        ).fit(train)
        rows.append(
            {
                "model": "gmm-diag (pyro-cwm EM)",
                "parameters": K * 4 + K - 1,
                "nll_logit": -fit.score(test),
                "epochs": fit.n_iter_,
                "time_s": time.perf_counter() - started,
                "s_per_epoch": None,
            }
        )
        print(rows[-1], flush=True)

    for row in rows:
        row["nll_image"] = row["nll_logit"] - log_det
    print(
        f"\nimage {args.image} {grey.shape}, train {args.num_train}, test {args.num_test}, "
        f"epochs {args.epochs}, batch {args.batch_size}, lr {args.lr}, "
        f"torch threads {torch.get_num_threads()}, device {device}"
    )
    header = (
        f"{'model':28s} {'params':>8s} {'NLL logit':>10s} {'NLL image':>10s} "
        f"{'epochs':>7s} {'s/epoch':>8s} {'total s':>8s}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        per = f"{r['s_per_epoch']:8.2f}" if r["s_per_epoch"] is not None else f"{'-':>8s}"
        print(
            f"{r['model']:28s} {r['parameters']:8d} {r['nll_logit']:10.4f} "
            f"{r['nll_image']:10.4f} {r['epochs']:7d} {per} {r['time_s']:8.1f}"
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "density.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
