"""Mixture of models / experts on MixtureLib's two-planes example: ours against MixtureLib.

For each seed s the data are ``pyro_cwm.data.two_planes(200, seed=s)`` (MixtureLib's recipe:
planes w = (10, 0) and (0, 30), noise sd 5); every method fits two linear experts, with a
Dirichlet gate (mixture of models, "MoM") and a softmax-network gate (mixture of experts,
"MoE"). The table gives the largest coefficient error after the best label permutation,
success (all four coefficients within 2.0) and the wall time of the fit; ``oracle`` is
least squares on each half with the true assignment known (the data's own error floor).

    python -m inference.bench.experts                       # seeds 0..9
    python -m inference.bench.experts --seeds 42 --mode hard
    PYTHONPATH=/path/to/mixturelib python -m inference.bench.experts   # adds MixtureLib

MixtureLib (0.4.0, not a dependency) runs when importable, as in its documentation:
``EachModelLinear`` experts, ``HyperModelDirichlet`` / ``HyperExpertNN(hidden_dim=5,
epochs=100)``, ``MixtureEM(HyperParameters={'beta': 1.}, model_type='sample')``, 10 epochs,
torch seeded with s; its own EM is timed, float32 on the CPU.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from inference.em.experts import fit_experts_em
from pyro_cwm.data import two_planes
from pyro_cwm.models import MixtureOfExperts, MixtureOfModels

TOLERANCE = 2.0


def plane_error(weights: torch.Tensor, truth: torch.Tensor) -> float:
    """Largest coefficient error after the best permutation of the experts."""
    weights = weights.detach().cpu().to(truth.dtype).reshape(truth.shape)
    return min(
        float((weights[list(p)] - truth).abs().max())
        for p in itertools.permutations(range(len(truth)))
    )


def run_ours(kind: str, X, Y, seed: int, mode: str, device: str) -> tuple[torch.Tensor, float]:
    cls = MixtureOfModels if kind == "MoM" else MixtureOfExperts
    model = cls(2, 2, seed=seed, mode=mode)
    X, Y = X.to(device), Y.to(device)
    started = time.perf_counter()
    fit_experts_em(model, X, Y)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return model.experts.post_mean, time.perf_counter() - started


def run_mixturelib(kind: str, X, Y, seed: int) -> tuple[torch.Tensor, float]:
    from mixturelib.hyper_models import HyperExpertNN, HyperModelDirichlet
    from mixturelib.local_models import EachModelLinear
    from mixturelib.mixture import MixtureEM

    torch.random.manual_seed(seed)
    experts = [EachModelLinear(input_dim=2), EachModelLinear(input_dim=2)]
    if kind == "MoM":
        gate = HyperModelDirichlet(output_dim=2)
    else:
        gate = HyperExpertNN(input_dim=2, hidden_dim=5, output_dim=2, epochs=100)
    mixture = MixtureEM(
        HyperParameters={"beta": 1.0}, HyperModel=gate, ListOfModels=experts,
        model_type="sample",
    )
    X, Y = X.float(), Y.float().reshape(-1, 1)
    started = time.perf_counter()
    mixture.fit(X, Y)
    elapsed = time.perf_counter() - started
    return torch.stack([m.W.reshape(-1) for m in experts]), elapsed


def run_oracle(X, Y) -> tuple[torch.Tensor, float]:
    started = time.perf_counter()
    half = X.shape[0] // 2
    X, Y = X.double(), Y.double()
    weights = [
        torch.linalg.lstsq(X[part], Y[part, None]).solution[:, 0]
        for part in (slice(0, half), slice(half, None))
    ]
    return torch.stack(weights), time.perf_counter() - started


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--mode", choices=("soft", "hard"), default="soft")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        import mixturelib  # noqa: F401

        methods = ["ours", "MixtureLib"]
    except ImportError:
        methods = ["ours"]
        print("MixtureLib is not importable: only ours runs")
    rows = []
    for seed in args.seeds:
        X, Y, truth = two_planes(200, seed=seed)
        weights, elapsed = run_oracle(X, Y)
        error = plane_error(weights, truth)
        rows.append({"seed": seed, "model": "-", "method": "oracle", "error": error,
                     "success": error < TOLERANCE, "time": elapsed})
    print("oracle (true assignment) errors: " + ", ".join(
        f"{r['seed']}: {r['error']:.2f}" for r in rows))
    print(f"{'seed':>4} {'model':>5} {'method':>10} {'max err':>8} {'success':>7} {'time s':>7}")
    for seed in args.seeds:
        X, Y, truth = two_planes(200, seed=seed)
        for kind in ("MoM", "MoE"):
            for method in methods:
                if method == "ours":
                    weights, elapsed = run_ours(kind, X, Y, seed, args.mode, args.device)
                else:
                    weights, elapsed = run_mixturelib(kind, X, Y, seed)
                error = plane_error(weights, truth)
                row = {
                    "seed": seed, "model": kind, "method": method, "error": error,
                    "success": error < TOLERANCE, "time": elapsed,
                }
                rows.append(row)
                print(
                    f"{seed:>4} {kind:>5} {method:>10} {error:>8.2f} "
                    f"{'yes' if row['success'] else 'NO':>7} {elapsed:>7.2f}"
                )
    print("\nsummary: successes / seeds, median wall time")
    for kind, method in itertools.product(("MoM", "MoE"), methods):
        sel = [r for r in rows if r["model"] == kind and r["method"] == method]
        times = sorted(r["time"] for r in sel)
        print(
            f"  {kind} {method:>10}: {sum(r['success'] for r in sel)}/{len(sel)}, "
            f"median {times[len(times) // 2]:.2f} s"
        )
    return rows


if __name__ == "__main__":
    main()
