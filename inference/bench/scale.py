"""AutoCWM at 10^2 to 10^5 latent dimensions against Pyro's Gaussian autoguides.

Targets (``--targets``), at each latent dimension D of ``--dims``, N = ``--points`` rows:

- ``linear``: w ~ N(0, 1)^D, y ~ N(X w, 1), X with AR(1) correlation 0.9 across columns
  (so the posterior is strongly correlated), written ``w @ X.T`` with ``y`` one event
  (``pyro_cwm.data.zoo.linreg``).
  Its posterior is Gaussian and exact (through the D x D or, for D > N, the N x N system).
- ``logistic``: the same w and X, y ~ Bernoulli(sigmoid(X w)), written as users write it,
  ``(X * w).sum(-1)`` in a data plate. No exact posterior: accuracy is not reported.

Methods (``--methods``): AutoCWM (every default, K = 4), AutoNormal,
AutoLowRankMultivariateNormal (Pyro's default rank, sqrt(D)) and AutoMultivariateNormal
(skipped above ``--mvn-max-dim``). Every method trains with ``fit_svi``'s defaults. AutoCWM
runs first for ``--steps`` steps; the others then get the same wall time (set-up and
training), their number of steps set from a short probe of their step time.

Each (target, D, method) runs in its own process, so that its peak memory (``ru_maxrss``
above the data's; on a GPU, ``torch.cuda.max_memory_allocated`` above the data's) is its
own. ``--device cuda`` puts the data on the GPU and runs each fit (set-up, steps and
draws) under ``torch.device("cuda")``, for the models' constants; the exact posterior is
solved there too. On the CPU nothing runs under ``torch.device``: its function mode slows
every torch call, which a CPU user does not pay. Columns: set-up (the
guide's first call) in seconds, the median step in ms, steps run, peak memory in MB, and
for ``linear`` the worst and median error of the marginal means in posterior sds and the
range and median of the sd ratios (``--samples`` draws).

    python -m inference.bench.scale --dims 100,1000,10000 --targets linear,logistic
    python -m inference.bench.scale --step-cost --dims 10000 --steps 50   # step side by side
    python -m inference.bench.scale --targets linear --dims 100000 --device cuda
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide import (
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)
from torch import Tensor

from inference.bench import write_rows
from inference.svi import fit_svi
from pyro_cwm.data.zoo import ar1_covariates, linreg
from pyro_cwm.guides import AutoCWM

METHODS = ("AutoCWM", "AutoNormal", "AutoLowRankMVN", "AutoMVN")
TARGETS = ("linear", "logistic")


def design(num_points: int, dim: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """X (N, D) with AR(1) correlation 0.9 across columns, and the true weights (D,)."""
    generator = torch.Generator().manual_seed(seed)
    x = ar1_covariates(num_points, dim, generator)
    w = torch.randn(dim, generator=generator) / math.sqrt(dim) * 3
    return x, w


def logistic(x: Tensor, y: Tensor) -> None:
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("y", dist.Bernoulli(logits=(x * w).sum(-1)), obs=y)


def make_target(name: str, dim: int, num_points: int, seed: int = 0, device: str = "cpu"):
    """``(model, args)`` of target ``name`` at dimension ``dim``, the data on ``device``
    (drawn on the CPU, so the same on every device)."""
    if name not in TARGETS:
        raise ValueError(f"unknown target {name!r}, not one of {TARGETS}")
    with torch.device("cpu"):  # also inside a fit's torch.device("cuda")
        x, w = design(num_points, dim, seed)
        generator = torch.Generator().manual_seed(seed + 1)
        if name == "linear":
            y = x @ w + torch.randn(num_points, generator=generator)
        else:
            y = torch.bernoulli(torch.sigmoid(x @ w), generator=generator)
    return (linreg if name == "linear" else logistic), (x.to(device), y.to(device))


def linear_posterior(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Exact posterior mean and marginal sds (D,) of ``linear`` (the zoo's ``linreg``):
    through the D x D precision I + X^T X, or for D > N through Woodbury's N x N system
    I + X X^T."""
    x, y = x.double(), y.double()
    n, d = x.shape
    if d <= n:
        chol = torch.linalg.cholesky(torch.eye(d, dtype=x.dtype, device=x.device) + x.T @ x)
        mean = torch.cholesky_solve((x.T @ y)[:, None], chol)[:, 0]
        variance = torch.cholesky_inverse(chol).diagonal()
        return mean, variance.sqrt()
    chol = torch.linalg.cholesky(torch.eye(n, dtype=x.dtype, device=x.device) + x @ x.T)
    mean = x.T @ torch.cholesky_solve(y[:, None], chol)[:, 0]
    half = torch.linalg.solve_triangular(chol, x, upper=False)  # L^-1 X, (N, D)
    variance = 1 - half.square().sum(0)
    return mean, variance.sqrt()


def make_guide(method: str, model):
    if method == "AutoCWM":
        return AutoCWM(model)
    if method == "AutoNormal":
        return AutoNormal(model)
    if method == "AutoLowRankMVN":
        return AutoLowRankMultivariateNormal(model)
    if method == "AutoMVN":
        return AutoMultivariateNormal(model)
    raise ValueError(f"unknown method {method!r}, not one of {METHODS}")


def peak_mb(device: str) -> float:
    """The process's peak memory so far in MB: resident on the CPU, allocated on a GPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def warm_torch_optim() -> None:
    """Pay torch's one-time cost of its first optimizer in a process (about 1.5 s of lazy
    imports), which every fit pays anyway, before a set-up is timed (AutoCWM's L-BFGS
    would pay it there)."""
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])


def on_device(device: str):
    """``torch.device(device)`` on a GPU, where the models' constants must be made there;
    no context on the CPU, where its function mode would only slow every torch call (by a
    quarter in the 1,000-D linear regression's set-up)."""
    return torch.device(device) if torch.device(device).type == "cuda" else nullcontext()


def timed_setup(guide, data, device: str) -> float:
    """Seconds of the guide's first call (its set-up)."""
    started = time.perf_counter()
    with torch.no_grad():
        guide(*data)
    synchronize(device)
    return time.perf_counter() - started


def run_one(target: str, dim: int, method: str, args) -> dict:
    """One fit in this process: set-up, steps (``args.steps``, or the wall time
    ``args.budget`` in seconds), memory and, for ``linear``, accuracy."""
    torch.set_num_threads(args.threads)
    model, data = make_target(target, dim, args.points, device=args.device)
    warm_torch_optim()
    baseline = peak_mb(args.device)
    pyro.set_rng_seed(0)
    guide = make_guide(method, model)
    setup_s = timed_setup(guide, data, args.device)  # parameters, and AutoCWM's start
    steps = args.steps
    if args.budget is not None:  # the same wall time as AutoCWM's set-up and fit
        fit_svi(model, guide, *data, num_steps=5, progress=False)  # warm-up
        probe = fit_svi(model, guide, *data, num_steps=30, progress=False)
        step_s = probe["time_s"] / 30
        steps = int(max(20, min(args.max_steps, (args.budget - setup_s) / step_s)))
    history = fit_svi(model, guide, *data, num_steps=steps, progress=False)
    row = {
        "target": target,
        "dim": dim,
        "method": method,
        "setup_s": setup_s,
        "steps": steps,
        "step_ms": 1e3 * history["time_s"] / steps,
        "total_s": setup_s + history["time_s"],
        "peak_mb": peak_mb(args.device) - baseline,
        "device": args.device,
    }
    if target == "linear":
        mean, sd = linear_posterior(*data)
        # The guide alone, in vectorized batches: at 10^5 dimensions the model's call
        # (N x D) is what a draw costs, and w is all that is read.
        batches = [min(250, args.samples - i) for i in range(0, args.samples, 250)]
        with torch.no_grad(), poutine.block():
            draws = []
            for size in batches:
                with pyro.plate("draws", size, dim=-1):
                    draws.append(guide(*data)["w"].reshape(size, dim))
            draws = torch.cat(draws)
        draws = draws.double()
        error = (draws.mean(0) - mean).abs() / sd
        ratio = draws.std(0) / sd
        row.update(
            mean_err_max=error.max().item(),
            mean_err_median=error.median().item(),
            sd_ratio_min=ratio.min().item(),
            sd_ratio_median=ratio.median().item(),
            sd_ratio_max=ratio.max().item(),
        )
    return row


def step_cost(target: str, dim: int, args, rounds: int = 5) -> dict:
    """AutoCWM's ``fit_svi`` step against AutoNormal's in this process, side by side:
    both set up and warmed up, then ``rounds`` rounds of a fresh AutoCWM's timed set-up
    and a block of ``args.steps`` steps of each guide; the medians of the set-ups, of the
    blocks' times per step and their ratio (interleaved, so that a machine whose speed
    drifts does not favour one figure)."""
    torch.set_num_threads(args.threads)
    model, data = make_target(target, dim, args.points, device=args.device)
    warm_torch_optim()
    guides = {}
    pyro.clear_param_store()  # AutoNormal's parameters of an earlier dimension
    for method in ("AutoCWM", "AutoNormal"):
        pyro.set_rng_seed(0)
        guides[method] = make_guide(method, model)
        timed_setup(guides[method], data, args.device)
        fit_svi(model, guides[method], *data, num_steps=5, progress=False)
    times, setups = {method: [] for method in guides}, []
    for i in range(rounds):
        pyro.set_rng_seed(0)
        fresh = make_guide("AutoCWM", model)
        fresh._pyro_name = f"setup_{i}"  # its own parameters, beside the fitted guide's
        setups.append(timed_setup(fresh, data, args.device))
        for method, guide in guides.items():
            history = fit_svi(model, guide, *data, num_steps=args.steps, progress=False)
            times[method].append(history["time_s"] / args.steps)
    cwm, normal = (statistics.median(times[m]) for m in ("AutoCWM", "AutoNormal"))
    components = guides["AutoCWM"].num_components
    return {
        "target": target,
        "dim": dim,
        "device": args.device,
        "autocwm_setup_s": statistics.median(setups),
        "autocwm_step_ms": 1e3 * cwm,
        "autonormal_step_ms": 1e3 * normal,
        "ratio": cwm / normal,
        "ratio_over_K": cwm / normal / components,
        "setup_over_2000_steps": statistics.median(setups) / (2000 * cwm),
    }


def child(target: str, dim: int, method: str, args, budget: float | None) -> dict:
    """``run_one`` in a fresh process (its own peak memory)."""
    command = [sys.executable, "-m", "inference.bench.scale", "--one", f"{target}:{dim}:{method}"]
    command += ["--points", str(args.points), "--steps", str(args.steps)]
    command += ["--samples", str(args.samples), "--threads", str(args.threads)]
    command += ["--max-steps", str(args.max_steps), "--device", args.device]
    if budget is not None:
        command += ["--budget", str(budget)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        error = f"exit status {done.returncode}: {last[:200]}"
        return {"target": target, "dim": dim, "method": method, "error": error}
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows: list[dict]) -> str:
    columns = [
        ("setup_s", 8, ".1f"),
        ("step_ms", 8, ".1f"),
        ("steps", 6, "d"),
        ("total_s", 8, ".0f"),
        ("peak_mb", 8, ".0f"),
        ("mean_err_max", 12, ".3f"),
        ("mean_err_median", 15, ".3f"),
        ("sd_ratio_min", 12, ".2f"),
        ("sd_ratio_median", 15, ".2f"),
        ("sd_ratio_max", 12, ".2f"),
    ]
    names = " ".join(f"{c:>{w}s}" for c, w, _ in columns)
    head = f"{'target':9s} {'D':>6s} {'method':15s} {names}"
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['target']:9s} {r['dim']:6d} {r['method']:15s} error: {r['error']}")
            continue
        cells = []
        for c, w, f in columns:
            value = r.get(c)
            cells.append(f"{value:{w}{f}}" if value is not None else f"{'-':>{w}s}")
        lines.append(f"{r['target']:9s} {r['dim']:6d} {r['method']:15s} " + " ".join(cells))
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(
        prog="python -m inference.bench.scale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--targets", default=",".join(TARGETS))
    p.add_argument("--dims", default="100,1000,10000")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--points", type=int, default=2000, help="rows N of the data")
    p.add_argument("--steps", type=int, default=2000, help="AutoCWM's fit_svi steps")
    p.add_argument("--max-steps", type=int, default=20_000, help="cap of the others' steps")
    p.add_argument("--samples", type=int, default=2000, help="draws for the accuracy")
    p.add_argument("--mvn-max-dim", type=int, default=2000, help="largest D for AutoMVN")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="device of the data and the fits")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per fit process")
    p.add_argument("--out", default="bench-out/scale.json")
    p.add_argument(
        "--step-cost",
        action="store_true",
        help="only AutoCWM's step against AutoNormal's, side by side in one process "
        "(--steps steps per block, five blocks each)",
    )
    p.add_argument("--one", help=argparse.SUPPRESS)  # TARGET:DIM:METHOD, in this process
    p.add_argument("--budget", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        target, dim, method = args.one.split(":")
        with on_device(args.device):
            row = run_one(target, int(dim), method, args)
        print(json.dumps(row), flush=True)
        return []
    for name in args.targets.split(","):
        if name not in TARGETS:
            p.error(f"unknown target {name!r}")
    methods = args.methods.split(",")
    for name in methods:
        if name not in METHODS:
            p.error(f"unknown method {name!r}")
    rows = []
    if args.step_cost:
        for target in args.targets.split(","):
            for dim in (int(d) for d in args.dims.split(",")):
                with on_device(args.device):
                    rows.append(step_cost(target, dim, args))
                print(json.dumps(rows[-1]), flush=True)
        write_rows(rows, args.out)
        return rows
    for target in args.targets.split(","):
        for dim in (int(d) for d in args.dims.split(",")):
            budget = None
            for method in methods:
                if method == "AutoMVN" and dim > args.mvn_max_dim:
                    continue
                row = child(target, dim, method, args, budget if method != "AutoCWM" else None)
                if method == "AutoCWM" and "error" not in row:
                    budget = row["total_s"]
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(f"\nN = {args.points}; AutoCWM {args.steps} steps, the others its wall time")
    print(table(rows))
    write_rows(rows, args.out)
    return rows


if __name__ == "__main__":
    main()
