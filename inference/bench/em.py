"""EM speed: GaussianMixtureEM against scikit-learn (and pomegranate where it installs).

Every method gets the same data, the same initial parameters (weights, means and
precisions from one k-means start, passed as ``*_init``) and the same number of
iterations (``tol=0``), so the times compare the same work; the table gives wall time,
the speed ratio against scikit-learn and the final mean log-likelihood of each fit
(scored by scikit-learn's ``score`` formula through each fitted model).

    python -m inference.bench.em                               # both sizes, diag and full
    python -m inference.bench.em --sizes small --threads 1 --repeats 3   # a busy machine
    python -m inference.bench.em --sizes large --device cuda   # ours on the GPU

Sizes: small N=100,000, D=32, K=16; large N=1,000,000, D=64, K=64 (20 iterations).
scikit-learn and pomegranate always run on the CPU with ``--threads`` threads (numpy's
BLAS threads are set through threadpoolctl); ours runs on ``--device``.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from inference.em.estimator import GaussianMixtureEM

SIZES = {"small": (100_000, 32, 16), "large": (1_000_000, 64, 64)}


def make_data(n: int, d: int, k: int, seed: int, dtype) -> np.ndarray:
    """A K-cluster mixture with random means and diagonal scales, shape (n, d)."""
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=3.0, size=(k, d))
    scales = rng.uniform(0.5, 1.5, size=(k, d))
    labels = rng.integers(0, k, n)
    return (means[labels] + scales[labels] * rng.standard_normal((n, d))).astype(dtype)


def initial_parameters(x: np.ndarray, k: int, family: str, seed: int) -> dict:
    """One k-means start (on at most 50,000 points), as ``*_init`` arguments."""
    sub = x[np.random.default_rng(seed).permutation(len(x))[:50_000]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = GaussianMixtureEM(k, covariance_type=family, max_iter=0, random_state=seed)
        start.fit(sub)
    return {
        "weights_init": start.weights_.astype(np.float64),
        "means_init": start.means_,
        "precisions_init": start.precisions_,
    }


def time_sklearn(x, k, family, iters, init) -> tuple[float, float]:
    from sklearn.mixture import GaussianMixture

    model = GaussianMixture(
        k, covariance_type=family, max_iter=iters, tol=0.0, init_params="random_from_data",
        **init,
    )
    started = time.perf_counter()
    model.fit(x)
    elapsed = time.perf_counter() - started
    return elapsed, float(model.score(x))


def time_ours(x, k, family, iters, init, device) -> tuple[float, float]:
    model = GaussianMixtureEM(
        k, covariance_type=family, max_iter=iters, tol=0.0, init_params="random_from_data",
        device=device, **init,
    )
    if device.startswith("cuda"):  # warm up kernels and the allocator on a slice
        GaussianMixtureEM(k, covariance_type=family, max_iter=2, tol=0.0, device=device,
                          init_params="random_from_data", **init).fit(x[:20_000])
        torch.cuda.synchronize()
    started = time.perf_counter()
    model.fit(x)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - started
    return elapsed, float(model.score(x))


def time_pomegranate(x, k, family, iters, init) -> tuple[float, float]:
    from pomegranate.distributions import Normal
    from pomegranate.gmm import GeneralMixtureModel

    xt = torch.from_numpy(x)
    if family == "full":
        covs = np.linalg.inv(init["precisions_init"])
    else:
        covs = 1.0 / init["precisions_init"]
    components = [
        Normal(means=torch.from_numpy(m), covs=torch.from_numpy(c), covariance_type=family)
        for m, c in zip(init["means_init"], covs.astype(x.dtype))
    ]
    model = GeneralMixtureModel(
        components, priors=torch.from_numpy(init["weights_init"].astype(x.dtype)),
        max_iter=iters, tol=0.0, verbose=False,
    )
    started = time.perf_counter()
    model.fit(xt)
    elapsed = time.perf_counter() - started
    return elapsed, float(model.log_probability(xt).mean())


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="small,large", help="comma list of small,large")
    parser.add_argument("--families", default="diag,full")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads of every method")
    parser.add_argument("--device", default="cpu", help="device of GaussianMixtureEM")
    parser.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    parser.add_argument("--peers", default="sklearn,pomegranate")
    parser.add_argument("--num-points", type=int, help="override N (quick looks)")
    parser.add_argument(
        "--repeats", type=int, default=1,
        help="time every method this many times, interleaved, and keep the fastest",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)

    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    peers = [p for p in args.peers.split(",") if p]
    rows = []
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, "
        f"dtype {args.dtype}, {args.iters} iterations",
        flush=True,
    )
    with threadpool_limits(limits=args.threads):
        for size in args.sizes.split(","):
            n, d, k = SIZES[size]
            n = args.num_points or n
            x = make_data(n, d, k, args.seed, args.dtype)
            for family in args.families.split(","):
                init = initial_parameters(x, k, family, args.seed)
                timers = {"pyro-cwm": lambda *a: time_ours(*a, args.device),
                          "sklearn": time_sklearn, "pomegranate": time_pomegranate}
                methods = ["pyro-cwm", *peers]
                results = {}
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # ConvergenceWarning: tol=0 by design
                    for _ in range(args.repeats):  # interleaved; the fastest of each counts
                        for method in list(methods):
                            try:
                                seconds, loglik = timers[method](x, k, family, args.iters, init)
                            except ImportError as error:
                                print(f"{method}: not installed ({error})", flush=True)
                                methods.remove(method)
                                continue
                            best = results.get(method, (float("inf"), None))[0]
                            results[method] = (min(seconds, best), loglik)
                base = results.get("sklearn", (None,))[0]
                for method, (seconds, loglik) in results.items():
                    row = {
                        "size": size, "N": n, "D": d, "K": k, "family": family,
                        "method": method, "device": args.device if method == "pyro-cwm" else "cpu",
                        "seconds": seconds, "speedup_vs_sklearn": base / seconds if base else None,
                        "mean_loglik": loglik,
                    }
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    print()
    print("| size | family | method | device | s | × sklearn | mean log-lik |")
    print("|---|---|---|---|---:|---:|---:|")
    for r in rows:
        speed = f"{r['speedup_vs_sklearn']:.2f}" if r["speedup_vs_sklearn"] else "-"
        print(
            f"| {r['size']} (N={r['N']:,}, D={r['D']}, K={r['K']}) | {r['family']} | "
            f"{r['method']} | {r['device']} | {r['seconds']:.2f} | {speed} | "
            f"{r['mean_loglik']:.6f} |"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
