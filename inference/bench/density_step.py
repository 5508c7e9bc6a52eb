"""The step suite of the density benchmark: one training step of a CWM against the flops limit.

A CWM's density needs its classifier at the K latent points ``z_k = T_k^{-1}(x)`` of every
datum: one batched call on a (B, K, d) tensor (no loop over k), whose matrix products cost
``2 B K (d h_1 + h_1 h_2 + ... + h_L K)`` flops forward and about twice that backward. This
suite times a step (forward, backward, Adam) of each model on a batch of 2-D points,
measures this CPU's single-thread peak on a large float32 matrix product, and reports the
classifier's flops per step and the fraction of the peak the step reaches.
"""

from __future__ import annotations

import time

import torch

from inference.bench.density_models import MODELS, num_parameters
from pyro_cwm.data import toy_density

DEFAULT_MODELS = "cwm,cwm-affine,cwm-flow,realnvp-s,nsf-s,maf-s"


def matmul_peak(size: int = 512, repeats: int = 20) -> float:
    """Flops per second of a float32 ``size x size`` matrix product (best of ``repeats``)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def classifier_flops(model, batch: int) -> int:
    """Flops of the classifier's matrix products in one step (forward + backward = 3x)."""
    linears = [m for m in model.classifier.modules() if isinstance(m, torch.nn.Linear)]
    macs = sum(m.in_features * m.out_features for m in linears)
    return 3 * 2 * batch * model.num_components * macs


def time_step(model, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of one step (forward, backward, Adam) on the batch ``x``."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    times = []
    for i in range(repeats + 3):
        started = time.perf_counter()
        loss = -model().log_prob(x).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if i >= 3:  # warm-up
            times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def run(args) -> dict:
    """The step suite for parsed command-line ``args`` (see ``inference.bench.density``)."""
    batch, k = args.batch_size or 512, args.components or 16
    x = toy_density("pinwheel").sample(batch, seed=args.seed)
    peak = matmul_peak()
    rows = []
    print(f"batch {batch}, K {k}, torch threads {torch.get_num_threads()}")
    print(f"single-thread float32 matmul peak: {peak / 1e9:.1f} GFLOP/s\n")
    print(f"{'model':12s} {'params':>8s} {'ms/step':>8s} {'classifier GFLOP':>17s} {'% peak':>7s}")
    for name in (args.models or DEFAULT_MODELS).split(","):
        torch.manual_seed(args.seed)
        model = MODELS[name](2, k)
        seconds = time_step(model, x, repeats=30)
        flops = classifier_flops(model, batch) if hasattr(model, "classifier") else None
        row = {
            "model": name,
            "parameters": num_parameters(model),
            "ms_per_step": 1e3 * seconds,
            "classifier_flops": flops,
            "fraction_of_peak": flops / seconds / peak if flops else None,
        }
        rows.append(row)
        gf = f"{flops / 1e9:17.4f}" if flops else f"{'-':>17s}"
        pct = f"{100 * row['fraction_of_peak']:7.1f}" if flops else f"{'-':>7s}"
        print(f"{name:12s} {row['parameters']:8d} {row['ms_per_step']:8.2f} {gf} {pct}")
    return {"peak_flops": peak, "batch": batch, "components": k, "rows": rows}
