"""The digits suite of the density benchmark: 64-dimensional dequantized 8x8 digits.

scikit-learn's digits (the fixed stratified split of ``pyro_cwm.data.digits``) are
dequantized and taken to logit space by its ``Dequantize``; every model is fitted there
on the same training loop (the training images repeated with fresh uniform noise), and
scored in bits per dimension of the dequantized pixels on the test images (one seeded draw
of the noise): ``-(log p(z) + log|dz/dv|) / (64 log 2)``, the unit of FlowGMM's 2.29.
"""

from __future__ import annotations

import math
import time

import torch

from inference.bench.density_models import Fitted, Options, fit_em, fit_gradient
from pyro_cwm.data.digits import Dequantize, load_digits_split

DEFAULT_MODELS = "gmm,cwm,realnvp-s,nsf-s,maf-s,maf-l"
FLOW_GMM_BITS_PER_DIM = 2.29  # FlowGMM (supervised), inference.bench.flow_gmm


def bits_per_dim(fit: Fitted, z: torch.Tensor, log_det: torch.Tensor) -> float:
    with torch.no_grad():
        log_p = torch.cat([fit.log_prob(c) for c in z.split(2048)]) + log_det
    return (-log_p.mean() / (z.shape[1] * math.log(2))).item()


def run(args) -> dict:
    """The digits suite for parsed command-line ``args`` (see ``inference.bench.density``)."""
    options = Options.from_args(args, components=10, epochs=30, batch_size=256, lr=1e-3)
    started = time.perf_counter()
    x_train, _, x_test, _ = load_digits_split(seed=args.seed)
    deq = Dequantize()
    g = torch.Generator().manual_seed(args.seed)
    copies = max(1, args.num_train // x_train.shape[0])
    train = torch.cat([deq(x_train, g) for _ in range(copies)])
    z_test, log_det = deq.with_log_det(x_test, torch.Generator().manual_seed(args.seed + 1))
    rows = []
    print(f"{'model':16s} {'params':>8s} {'bits/dim':>9s} {'s/epoch':>8s} {'best/run':>9s}")
    for name in (args.models or DEFAULT_MODELS).split(","):
        fit = fit_em(train, z_test, options) if name == "gmm" else fit_gradient(
            name, train, z_test, options
        )
        row = {**fit.row, "bits_per_dim": bits_per_dim(fit, z_test, log_det)}
        rows.append(row)
        print(
            f"{row['model']:16s} {row['parameters']:8d} {row['bits_per_dim']:9.3f} "
            f"{row['s_per_epoch']:8.3f} {row['best_epoch']:4d}/{row['epochs']:<4d}",
            flush=True,
        )
    print(f"{'FlowGMM (ref.)':16s} {'-':>8s} {FLOW_GMM_BITS_PER_DIM:9.3f}")
    print(
        f"\ndigits: {train.shape[0]} training points ({copies} noise draws of "
        f"{x_train.shape[0]} images), {x_test.shape[0]} test images, K {options.components}, "
        f"epochs {options.epochs}, lr {options.lr}, total {time.perf_counter() - started:.0f} s"
    )
    return {"options": vars(options), "rows": rows}
