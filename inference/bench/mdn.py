"""Mixture density networks on the seed's 1-D inverse-sine problem: held-out NLL and time.

Data (``pyro_cwm.data.inverse_sine``): y on an even grid over [-1, 1],
``x = 7 sin(5y) + 0.5y + 0.5 eps``; the task is p(y | x), which has up to three modes.
Every model gets the same training set (512 points), the seed example's recipe (K = 3, one
hidden layer of 50 units, full-batch Adam, lr 0.005, cosine decay, 2000 steps) and is
scored by the mean NLL per point (nats, constants included) on a fresh held-out set with
uniform y. Several seeds, because a mixture fit can stop in a local optimum.

Models:

- ``ours``: ``pyro_cwm.models.MixtureDensityNetwork`` (diagonal noise, variance floor),
  its inputs standardized with the training x (``standardize_inputs``).
- ``ours-raw``: the same, fed raw x as the seed's example does.
- ``ours-cwm``: the standardized network with the conditional CWM head (``head="cwm"``).
- ``recipe``: a plain Bishop MDN written here from the seed's description (separate
  softmax and Gaussian networks of one ELU layer, sigma = exp(output), no floor): a
  stand-in for the seed's code, which is not on PyPI. ``recipe-std``: the same fed
  standardized x, to show what the standardization alone is worth.
- ``seed``: the seed's own ``src.blocks.MixtureDensityNetwork``, only with
  ``--seed-mdn PATH`` pointing at a checkout of its repository (otherwise reported as not
  available). Its held-out NLL is computed from its predicted (log pi, mu, sigma) with
  [`GaussianMixture`][pyro_cwm.distributions.GaussianMixture], so a loss without the
  ``log 2 pi`` constant does not skew the comparison.

    python -m inference.bench.mdn                      # about 2 min on one core
    python -m inference.bench.mdn --seed-mdn ~/src/mixture-density-network
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from pyro_cwm import GaussianMixture
from pyro_cwm.data.toy import inverse_sine
from pyro_cwm.models import MixtureDensityNetwork


class RecipeMDN(nn.Module):
    """A textbook MDN as the seed describes it: ``log_softmax`` weights, diagonal Gaussians.

    Two networks ``x -> hidden -> K`` (weights) and ``x -> hidden -> 2 K d`` (means and
    log standard deviations), ELU activations, sigma = exp(log sigma) without a floor.
    """

    def __init__(self, input_dim: int, output_dim: int, num_components: int, hidden: int):
        super().__init__()
        self.k, self.d = num_components, output_dim
        self.weights = nn.Sequential(
            nn.Linear(input_dim, hidden), nn.ELU(), nn.Linear(hidden, num_components)
        )
        self.gaussians = nn.Sequential(
            nn.Linear(input_dim, hidden),
            nn.ELU(),
            nn.Linear(hidden, 2 * num_components * output_dim),
        )

    def forward(self, x: Tensor) -> GaussianMixture:
        logits = torch.log_softmax(self.weights(x), dim=-1)
        loc, log_sigma = self.gaussians(x).unflatten(-1, (self.k, 2 * self.d)).chunk(2, -1)
        return GaussianMixture(loc, log_sigma.exp(), "diag", logits=logits)


def _seed_distribution(model, x: Tensor) -> GaussianMixture:
    """The seed MDN's p(y | x), from what its forward returns: (log pi, mu, sigma)."""
    log_pi, mu, sigma = model(x)[:3]
    k = log_pi.shape[-1]
    d = mu.shape[-1] // k if mu.dim() == 2 else mu.shape[-1]
    mu = mu.reshape(*log_pi.shape, d)
    sigma = sigma.reshape(*log_pi.shape, d)
    return GaussianMixture(mu, sigma, "diag", logits=log_pi)


def train(
    loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor, params, steps: int, lr: float
) -> tuple[float, list[float]]:
    """Full-batch Adam with cosine decay (the seed example's loop); returns time and losses."""
    optimizer = torch.optim.Adam(params, lr=lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    losses = []
    started = time.perf_counter()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn(x, y)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    return time.perf_counter() - started, losses


def build(name: str, args: argparse.Namespace, x_train: Tensor):
    """The model ``name`` and its loss: mean NLL per point of (x, y)."""
    k, hidden = args.components, args.hidden
    if name in ("ours", "ours-raw", "ours-cwm"):
        head = "cwm" if name == "ours-cwm" else "gaussian"
        options = {"hidden_dims": (hidden,)} if head == "cwm" else None
        model = MixtureDensityNetwork(
            1, 1, k, hidden_dims=(hidden,), head=head, cwm_options=options
        )
        if name != "ours-raw":
            model.standardize_inputs(x_train)
        return model, lambda x, y: -model.log_prob(y, x).mean()
    if name in ("recipe", "recipe-std"):
        model = RecipeMDN(1, 1, k, hidden)
        loc, scale = (x_train.mean(), x_train.std()) if name == "recipe-std" else (0.0, 1.0)
        return model, lambda x, y: -model((x - loc) / scale).log_prob(y).mean()
    if name == "seed":
        sys.path.insert(0, str(Path(args.seed_mdn).expanduser()))
        blocks = importlib.import_module("src.blocks")
        model = blocks.MixtureDensityNetwork(
            1, 1, n_components=k, hidden_dim=hidden, noise_type=blocks.NoiseType.DIAGONAL
        )
        return model, lambda x, y: -_seed_distribution(model, x).log_prob(y).mean()
    raise ValueError(f"unknown model {name!r}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m inference.bench.mdn",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--models", default="ours,ours-raw,ours-cwm,recipe,recipe-std,seed")
    p.add_argument("--seed-mdn", default=None, help="checkout of the seed MDN repository")
    p.add_argument("--num-train", type=int, default=512)
    p.add_argument("--num-test", type=int, default=10_000)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--lr", type=float, default=0.005)
    p.add_argument("--components", type=int, default=3)
    p.add_argument("--hidden", type=int, default=50)
    p.add_argument("--seeds", type=int, default=5, help="number of seeds (0, 1, ...)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        if name == "seed" and args.seed_mdn is None:
            print("seed: not available (pass --seed-mdn PATH to a checkout of the seed MDN)")
            continue
        nlls, times = [], []
        for seed in range(args.seeds):
            x, y = inverse_sine(args.num_train, seed=seed)
            x_test, y_test = inverse_sine(args.num_test, uniform=True, seed=10_000 + seed)
            torch.manual_seed(seed)
            model, nll = build(name, args, x)
            seconds, _ = train(nll, x, y, model.parameters(), args.steps, args.lr)
            with torch.no_grad():
                nlls.append(nll(x_test, y_test).item())
            times.append(seconds)
        row = {
            "model": name,
            "parameters": sum(p.numel() for p in model.parameters()),
            "test_nll": nlls,
            "test_nll_mean": statistics.fmean(nlls),
            "test_nll_best": min(nlls),
            "time_s": statistics.fmean(times),
            "steps": args.steps,
        }
        rows.append(row)
        print(
            f"{name:9s} params {row['parameters']:5d}  held-out NLL mean {row['test_nll_mean']:.4f}"
            f"  best {row['test_nll_best']:.4f}  per seed "
            + " ".join(f"{v:.4f}" for v in nlls)
            + f"  time {row['time_s']:.2f} s / {args.steps} steps",
            flush=True,
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=2))
    # The Bayes rate, for scale: the NLL of the true p(y | x) is not closed form, but
    # log(2) (y uniform on [-1, 1]) is the NLL of ignoring x.
    print(f"reference: ignoring x entirely gives NLL {math.log(2):.4f}")
    return rows


if __name__ == "__main__":
    main()
