"""EM speed: GaussianMixtureEM against scikit-learn (and pomegranate where it installs).

Every method gets the same data, the same initial parameters (weights, means and
precisions from one k-means start, passed as ``*_init``) and the same number of
iterations (``tol=0``), so the times compare the same work. The table gives, per family,
thread count and dtype, the median wall time of ``--repeats`` interleaved fits, the speed
ratio against scikit-learn's float64 fit at the same thread count, each fit's mean
log-likelihood and its relative difference to scikit-learn's (every fit scored in float64
by scikit-learn's ``score``, a float32 fit through its parameters), and the arithmetic
rate: flops per iteration, GFLOP/s and the fraction of this machine's matmul peak.

    python -m inference.bench.em                               # both sizes, diag and full
    python -m inference.bench.em --sizes small --families spherical,diag,tied,full \
        --dtype float32,float64 --threads 1,2 --repeats 3      # the full table
    python -m inference.bench.em --sizes large --device cuda   # ours on the GPU

Sizes: small N=100,000, D=32, K=16; large N=1,000,000, D=64, K=64 (20 iterations).
scikit-learn (float64: its float32 is not faster) and pomegranate always run on the CPU
with the same threads as ours (``torch.set_num_threads`` and, for numpy's BLAS,
threadpoolctl); ours runs on ``--device`` in each ``--dtype``.

Flops per iteration (``N`` times the dominant flops per point; a multiply-add counts two;
the O(K) exp/max/sum per point and the M-step's O(K d^2) are left out):

- ours, moments about the origin (``inference.em.estep.flops_per_point``): two GEMMs
  ``4 K m`` with ``m`` features per point, ``m = d + q + 1``, ``q`` = ``d(d+1)/2`` (full),
  ``d`` (diag), 1 (spherical), plus the ``q`` products that make the features; tied
  ``4 K d`` (its log-densities are linear in x; the scatter is summed once per fit).
- ours, centered scheme (float32 with clusters far from the data's mean; the ``scheme``
  column says how many iterations took it): ``K (4 d^2 + 5 d)`` full and tied, ``8 K d``
  diag, ``7 K d`` spherical (``inference.em.estep.centered_flops_per_point``).
- scikit-learn: full ``4 K d^2 + 2 K d`` (per component a whitening product in the
  E-step, a weighted scatter in the M-step), tied ``2 K d^2 + 2 d^2 + 2 K d``, diag
  ``8 K d`` (four (N, d) x (d, K) products), spherical ``6 K d``.

GFLOP/s is flops per iteration times ``--iters`` over the wall time (which also holds the
set-up and the final labelling pass of ``fit``), so it understates the rate of an
iteration. The peak is measured at start-up at each thread count: the best of five
2048 x 2048 torch matmuls in that dtype (4096 on a GPU), which on a shared machine
also varies with the neighbours' load. The rows keep the 1-minute load average before
each thread count (``load_before``): with more runnable threads than cores, every
parallel region waits for a descheduled thread, and both libraries' times at 2 threads
grow several-fold.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from inference.em.estep import centered_flops_per_point, flops_per_point
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


def sklearn_score(x64: np.ndarray, family: str, weights, means, precisions_cholesky) -> float:
    """Mean log-likelihood of float64 data under given parameters, by scikit-learn's code.

    Every fit is scored the same way, in float64, whatever dtype it was fitted in.
    """
    from sklearn.mixture import GaussianMixture

    model = GaussianMixture(len(weights), covariance_type=family)
    model.weights_ = np.asarray(weights, np.float64)
    model.means_ = np.asarray(means, np.float64)
    model.precisions_cholesky_ = np.asarray(precisions_cholesky, np.float64)
    model.covariances_ = model.precisions_ = None  # not read by score
    return float(model.score(x64))


def time_sklearn(x, k, family, iters, init) -> tuple[float, float, str]:
    from sklearn.mixture import GaussianMixture

    model = GaussianMixture(
        k, covariance_type=family, max_iter=iters, tol=0.0, init_params="random_from_data",
        **init,
    )
    started = time.perf_counter()
    model.fit(x)
    elapsed = time.perf_counter() - started
    return elapsed, float(model.score(x)), "sklearn"


def time_ours(x, x64, k, family, iters, init, device) -> tuple[float, float, str]:
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
    centered = model._centered_steps
    scheme = "origin" if centered == 0 else f"centered {centered}/{model.n_iter_}"
    fitted = (model.weights_, model.means_, model.precisions_cholesky_)
    return elapsed, sklearn_score(x64, family, *fitted), scheme


def time_pomegranate(x, k, family, iters, init) -> tuple[float, float, str]:
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
    return elapsed, float(model.log_probability(xt).mean()), "-"


def sklearn_flops_per_point(family: str, d: int, k: int) -> int:
    """The dominant flops of one scikit-learn EM iteration per point (see the docstring)."""
    return {
        "full": 4 * k * d * d + 2 * k * d,
        "tied": 2 * k * d * d + 2 * d * d + 2 * k * d,
        "diag": 8 * k * d,
        "spherical": 6 * k * d,
    }[family]


def ours_flops_per_point(family: str, d: int, k: int, scheme: str) -> int:
    """The dominant flops of one of our EM iterations per point, for the scheme it ran."""
    if scheme.startswith("centered"):
        return centered_flops_per_point(family, d, k)
    return flops_per_point(family, d, k)


def matmul_peak(dtype: torch.dtype, device: str, repeats: int = 5) -> float:
    """This machine's matmul GFLOP/s in ``dtype`` at the current thread count: the best of
    ``repeats`` products of two 2048 x 2048 matrices (4096 on a GPU)."""
    n = 4096 if device.startswith("cuda") else 2048
    a = torch.randn(n, n, dtype=dtype, device=device)
    b, out = torch.randn_like(a), torch.empty_like(a)
    best = math.inf
    for _ in range(repeats + 1):  # the first warms up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        started = time.perf_counter()
        torch.mm(a, b, out=out)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return 2 * n**3 / best / 1e9


def comma_list(kind):
    return lambda text: [kind(part) for part in text.split(",") if part]


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="small,large", help="comma list of small,large")
    parser.add_argument("--families", default="diag,full")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument(
        "--threads", type=comma_list(int), default=[1],
        help="CPU threads of every method, a comma list (e.g. 1,2)",
    )
    parser.add_argument("--device", default="cpu", help="device of GaussianMixtureEM")
    parser.add_argument(
        "--dtype", "--dtypes", dest="dtypes", type=comma_list(str), default=["float64"],
        help="our dtypes, a comma list of float32,float64 (scikit-learn: float64)",
    )
    parser.add_argument("--peers", default="sklearn,pomegranate")
    parser.add_argument("--num-points", type=int, help="override N (quick looks)")
    parser.add_argument(
        "--repeats", type=int, default=1,
        help="time every method this many times, interleaved, and keep the median",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args(argv)
    for dtype in args.dtypes:
        if dtype not in ("float32", "float64"):
            parser.error(f"--dtype: float32 or float64, got {dtype!r}")

    from threadpoolctl import threadpool_limits

    peers = [p for p in args.peers.split(",") if p]
    rows = []
    print(
        f"torch {torch.__version__}, threads {args.threads}, device {args.device}, "
        f"dtypes {args.dtypes}, {args.iters} iterations, median of {args.repeats}",
        flush=True,
    )
    for threads in args.threads:
        torch.set_num_threads(threads)
        with threadpool_limits(limits=threads):
            wanted = {("cpu", name) for name in {*args.dtypes, "float64"}}
            wanted |= {(args.device, name) for name in args.dtypes}
            peaks = {key: matmul_peak(getattr(torch, key[1]), key[0]) for key in sorted(wanted)}
            shown = {f"{device} {name}": round(value, 1) for (device, name), value in peaks.items()}
            load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
            print(f"threads {threads}: matmul peak GFLOP/s {shown}, load {load}", flush=True)
            for size in args.sizes.split(","):
                for row in _size_rows(args, peers, threads, peaks, size):
                    row["load_before"] = load
                    rows.append(row)
    print()
    print(TABLE_HEAD)
    for r in rows:
        print(_table_line(r))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))
    return rows


TABLE_HEAD = (
    "| size | family | threads | method | dtype | device | s | × sklearn | mean log-lik "
    "| rel. Δ log-lik | GFLOP/iter | GFLOP/s | % peak | scheme |\n"
    "|---|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"
)


def _table_line(r: dict) -> str:
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    return (
        f"| {r['size']} (N={r['N']:,}, D={r['D']}, K={r['K']}) | {r['family']} | "
        f"{r['threads']} | {r['method']} | {r['dtype']} | {r['device']} | "
        f"{r['seconds']:.2f} | {fmt(r['speedup_vs_sklearn'], '.2f')} | "
        f"{r['mean_loglik']:.6f} | {fmt(r['rel_loglik_vs_sklearn'], '.1e')} | "
        f"{fmt(r['gflop_per_iter'], '.3f')} | {fmt(r['gflops'], '.1f')} | "
        f"{fmt(r['peak_fraction'] and 100 * r['peak_fraction'], '.0f')} | {r['scheme']} |"
    )


def _size_rows(args, peers, threads, peaks, size) -> list[dict]:
    """Every family of one size at one thread count: interleaved repeats, medians."""
    n, d, k = SIZES[size]
    n = args.num_points or n
    x64 = make_data(n, d, k, args.seed, np.float64)
    data = {name: x64.astype(name) for name in args.dtypes}
    rows = []
    for family in args.families.split(","):
        init = initial_parameters(x64, k, family, args.seed)
        # (method, dtype): scikit-learn on the float64 data, ours and pomegranate per dtype
        cells = [("pyro-cwm", name) for name in args.dtypes]
        cells += [("sklearn", "float64")] if "sklearn" in peers else []
        cells += [("pomegranate", name) for name in args.dtypes if "pomegranate" in peers]
        timers = {
            "pyro-cwm": lambda x, *a: time_ours(x, x64, *a, args.device),
            "sklearn": time_sklearn,
            "pomegranate": time_pomegranate,
        }
        times, results = {}, {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ConvergenceWarning: tol=0 by design
            for _ in range(args.repeats):
                for cell in list(cells):
                    method, name = cell
                    x = x64 if method == "sklearn" else data[name]
                    try:
                        seconds, loglik, scheme = timers[method](x, k, family, args.iters, init)
                    except ImportError as error:
                        print(f"{method}: not installed ({error})", flush=True)
                        cells.remove(cell)
                        continue
                    times.setdefault(cell, []).append(seconds)
                    results[cell] = (loglik, scheme)
                    # a run stopped at a time limit still shows the cells it finished
                    print(f"{family} {method} {name}: {seconds:.2f} s", flush=True)
        reference = ("sklearn", "float64")
        base = statistics.median(times[reference]) if reference in times else None
        base_loglik = results.get(reference, (None,))[0]
        for cell in cells:
            method, name = cell
            seconds = statistics.median(times[cell])
            loglik, scheme = results[cell]
            device = args.device if method == "pyro-cwm" else "cpu"
            if method == "pyro-cwm":
                per_point = ours_flops_per_point(family, d, k, scheme)
            elif method == "sklearn":
                per_point = sklearn_flops_per_point(family, d, k)
            else:
                per_point = None
            gflop = per_point * n / 1e9 if per_point else None
            gflops = gflop * args.iters / seconds if gflop else None
            peak = peaks.get((device, name))
            row = {
                "size": size, "N": n, "D": d, "K": k, "family": family, "method": method,
                "device": device, "dtype": name,
                "threads": threads, "seconds": seconds, "seconds_all": times[cell],
                "speedup_vs_sklearn": base / seconds if base else None,
                "mean_loglik": loglik,
                "rel_loglik_vs_sklearn": (
                    abs(loglik - base_loglik) / abs(base_loglik) if base_loglik else None
                ),
                "gflop_per_iter": gflop, "gflops": gflops, "peak_gflops": peak,
                "peak_fraction": gflops / peak if gflops and peak else None,
                "scheme": scheme,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    main()
