"""CWM encoders in amortized guides: known multimodal posteriors and a VAE on the digits.

Two parts, each a table (the rows are also written as JSON):

- ``multimodal``: models whose exact evidence is known by quadrature. ``bimodal``:
  z_i ~ N(0, 1), x_i ~ N(z_i^2, 0.3^2) (two modes of z_i per point); ``four-modes``:
  z_i ~ N(0, I_2), x_i ~ N(z_i * z_i, 0.3^2 I) (four). 256 points, 2,000 Adam steps
  (lr 0.01), each encoder with its library's defaults: the Normal encoder (MLP 64) with
  ``Trace_ELBO``, the CWM encoder (``CWM(d, K, context_dim=d)``) with ``CWMELBO()``.
  Reported: -ELBO per point (64 particles) against the exact -log evidence per point.
- ``digits``: a VAE on scikit-learn's 8x8 digits, binarized (pixel > 8 of 16), with one
  decoder (z 4 -> 128 -> 64 Bernoulli logits) and one feature network (64 -> 128,
  Softplus) under each encoder: ``normal`` (a linear head to loc and log-scale),
  ``iaf`` (that Normal followed by two conditional IAF transforms of Pyro, widths chosen
  to match ``cwm4``'s parameters), ``cwm2``, ``cwm4``, ``cwm8``
  ([`CWMEncoder`][pyro_cwm.nn.CWMEncoder] with K components). Adam lr 1e-3, batch 128.
  Reported on the test split: -ELBO, -log p(x) by the IWAE bound with ``--iwae``
  samples, their difference (the inference gap of Cremer et al. 2018), the encoder's
  parameters and the time per epoch and per step.

    python -m inference.bench.vae
    python -m inference.bench.vae --parts digits --seeds 0 --epochs 20
"""

from __future__ import annotations

import argparse
import json
import math
import time

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import Permute, conditional_affine_autoregressive
from pyro.infer import SVI, Trace_ELBO
from torch import Tensor, nn

from inference.bench import write_rows
from inference.svi.elbo import CWMELBO
from pyro_cwm import CWM, CWMEncoder
from pyro_cwm.data.digits import load_digits_split

NOISE = 0.3
ENCODERS = ("normal", "iaf", "cwm2", "cwm4", "cwm8")


# --- models with known evidence --------------------------------------------------------


def squares_model(x: Tensor) -> None:
    """z_i ~ N(0, I_d), x_i ~ N(z_i * z_i, 0.3^2 I_d): 2^d modes of z_i for x_i > 0."""
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0).expand(x.shape[1:]).to_event(1))
        pyro.sample("x", dist.Normal(z * z, NOISE).to_event(1), obs=x)


def squares_data(n: int, dim: int, seed: int) -> Tensor:
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(n, dim, generator=generator)
    return z * z + NOISE * torch.randn(n, dim, generator=generator)


def squares_point_log_evidence(x: Tensor) -> Tensor:
    """log p(x_i) of ``squares_model`` for each point, by quadrature (the coordinates are
    independent): shape (n,), float64."""
    grid = torch.linspace(-10.0, 10.0, 40001, dtype=torch.float64)
    log_prior = dist.Normal(0.0, 1.0).log_prob(grid)
    log_lik = dist.Normal(grid**2, NOISE).log_prob(x.double().reshape(-1, 1))
    log_p = torch.logsumexp(log_prior + log_lik, -1) + math.log(grid[1] - grid[0])
    return log_p.reshape(x.shape).sum(-1)


def squares_log_evidence(x: Tensor) -> float:
    """log p(x) of ``squares_model`` by quadrature."""
    return squares_point_log_evidence(x).sum().item()


@torch.no_grad()
def point_neg_elbo(encoder: nn.Module, x: Tensor, samples: int = 256) -> Tensor:
    """-ELBO of each point of ``squares_model`` under ``encoder(x)``, by ``samples`` draws."""
    q = encoder(x)
    z = q.sample((samples,))
    log_p = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
    log_p = log_p + dist.Normal(z * z, NOISE).log_prob(x).sum(-1)
    return -(log_p - q.log_prob(z)).mean(0).double()


class NormalEncoder(nn.Module):
    """A diagonal Normal q(z | x): features, then a linear head to loc and log-scale."""

    def __init__(self, features: nn.Module, feature_dim: int, dim: int) -> None:
        super().__init__()
        self.features, self.head = features, nn.Linear(feature_dim, 2 * dim)

    def base(self, x: Tensor) -> tuple[dist.Distribution, Tensor]:
        h = self.features(x)
        loc, log_scale = self.head(h).chunk(2, -1)
        return dist.Normal(loc, log_scale.exp()).to_event(1), h

    def forward(self, x: Tensor) -> dist.Distribution:
        return self.base(x)[0]


class IAFEncoder(NormalEncoder):
    """The Normal encoder followed by conditional inverse autoregressive flows (IAF)."""

    def __init__(self, features: nn.Module, feature_dim: int, dim: int, width: int) -> None:
        super().__init__(features, feature_dim, dim)
        self.flows = nn.ModuleList(
            conditional_affine_autoregressive(dim, feature_dim, hidden_dims=[width, width])
            for _ in range(2)
        )
        self.register_buffer("reverse", torch.arange(dim - 1, -1, -1))

    def forward(self, x: Tensor) -> dist.Distribution:
        base, h = self.base(x)
        first, second = (flow.condition(h) for flow in self.flows)
        return dist.TransformedDistribution(base, [first, Permute(self.reverse), second])


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def make_encoder(kind: str, features: nn.Module, feature_dim: int, dim: int) -> nn.Module:
    if kind == "normal":
        return NormalEncoder(features, feature_dim, dim)
    if kind == "iaf":
        target = parameter_count(CWMEncoder(nn.Identity(), feature_dim, dim, 4))
        widths = range(4, 513, 4)
        counts = {
            w: parameter_count(IAFEncoder(nn.Identity(), feature_dim, dim, w)) for w in widths
        }
        width = min(widths, key=lambda w: abs(counts[w] - target))
        return IAFEncoder(features, feature_dim, dim, width)
    if kind.startswith("cwm"):
        return CWMEncoder(features, feature_dim, dim, int(kind[3:]))
    raise ValueError(f"unknown encoder {kind!r}; choose from {', '.join(ENCODERS)}")


def amortized_guide(encoder: nn.Module):
    def guide(x: Tensor) -> None:
        pyro.module("encoder", encoder)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", encoder(x))

    return guide


def default_loss(kind: str, particles: int = 1):
    """What each encoder's library trains it with by default."""
    if kind.startswith("cwm"):
        return CWMELBO() if particles == 1 else CWMELBO(num_particles=particles)
    return Trace_ELBO(num_particles=particles, vectorize_particles=True)


def multimodal_row(task: str, kind: str, seed: int, steps: int) -> dict:
    dim = {"bimodal": 1, "four-modes": 2}[task]
    x = squares_data(256, dim, seed)
    pyro.clear_param_store()
    torch.manual_seed(seed)
    if kind == "normal":
        encoder = NormalEncoder(nn.Sequential(nn.Linear(dim, 64), nn.SiLU()), 64, dim)
    else:
        encoder = CWM(dim, int(kind[3:]), context_dim=dim)
    guide = amortized_guide(encoder)
    svi = SVI(squares_model, guide, pyro.optim.Adam({"lr": 0.01}), default_loss(kind))
    start = time.perf_counter()
    for _ in range(steps):
        svi.step(x)
    seconds = time.perf_counter() - start
    loss = default_loss(kind, particles=64)
    neg_elbo = sum(loss.loss(squares_model, guide, x) for _ in range(4)) / 4 / x.shape[0]
    exact = -squares_point_log_evidence(x)
    point_gap = point_neg_elbo(encoder, x) - exact
    worst = int(point_gap.argmax())
    return {
        "part": "multimodal", "task": task, "encoder": kind, "seed": seed, "steps": steps,
        "neg_elbo": neg_elbo, "exact": exact.mean().item(), "gap": neg_elbo - exact.mean().item(),
        "worst_gap": point_gap[worst].item(), "worst_x": x[worst].tolist(),
        "step_ms": 1e3 * seconds / steps,
    }  # fmt: skip


# --- the digits VAE --------------------------------------------------------------------


class DigitsVAE(nn.Module):
    """A Bernoulli VAE on binarized 8x8 digits, with the encoder of ``kind``."""

    def __init__(self, kind: str, dim: int = 4, width: int = 128) -> None:
        super().__init__()
        self.dim = dim
        self.decoder = nn.Sequential(nn.Linear(dim, width), nn.Softplus(), nn.Linear(width, 64))
        features = nn.Sequential(nn.Linear(64, width), nn.Softplus())
        self.encoder = make_encoder(kind, features, width, dim)

    def model(self, x: Tensor) -> None:
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0).expand([self.dim]).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x: Tensor) -> None:
        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", self.encoder(x))

    @torch.no_grad()
    def log_weights(self, x: Tensor, samples: int, chunk: int = 100) -> Tensor:
        """``log p(x, z_s) - log q(z_s | x)`` for ``samples`` draws per image: (samples, n)."""
        q = self.encoder(x)
        prior = dist.Normal(x.new_zeros(()), 1.0).expand([self.dim]).to_event(1)
        out = []
        for size in [chunk] * (samples // chunk) + [samples % chunk] * (samples % chunk > 0):
            z = q.sample((size,))
            log_lik = dist.Bernoulli(logits=self.decoder(z)).to_event(1).log_prob(x)
            out.append(prior.log_prob(z) + log_lik - q.log_prob(z))
        return torch.cat(out)


def binarized_digits() -> tuple[Tensor, Tensor]:
    x_train, _, x_test, _ = load_digits_split()
    return (x_train > 8).float(), (x_test > 8).float()


def digits_row(kind: str, seed: int, epochs: int, iwae: int, batch: int = 128) -> dict:
    x_train, x_test = binarized_digits()
    pyro.clear_param_store()
    torch.manual_seed(seed)
    vae = DigitsVAE(kind)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), default_loss(kind))
    generator = torch.Generator().manual_seed(seed)
    steps, start = 0, time.perf_counter()
    for _ in range(epochs):
        for index in torch.randperm(len(x_train), generator=generator).split(batch):
            svi.step(x_train[index])
            steps += 1
    seconds = time.perf_counter() - start
    weights = vae.log_weights(x_test, iwae)
    neg_elbo = -weights[:100].mean().item()
    neg_ll = -(torch.logsumexp(weights, 0) - math.log(iwae)).mean().item()
    return {
        "part": "digits", "encoder": kind, "seed": seed, "epochs": epochs,
        "neg_elbo": neg_elbo, "neg_ll": neg_ll, "gap": neg_elbo - neg_ll,
        "params": parameter_count(vae.encoder), "epoch_s": seconds / epochs,
        "step_ms": 1e3 * seconds / steps,
    }  # fmt: skip


def summary(rows: list[dict]) -> str:
    lines = []
    multimodal = [r for r in rows if r["part"] == "multimodal"]
    if multimodal:
        lines += [
            "| task | encoder | seed | -ELBO/pt | exact -log p/pt | gap/pt | worst point: gap "
            "(x) | step ms |",
            "|---|---|---:|---:|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {r['task']} | {r['encoder']} | {r['seed']} | {r['neg_elbo']:.4f} | "
            f"{r['exact']:.4f} | {r['gap']:.4f} | {r['worst_gap']:.2f} "
            f"({', '.join(f'{v:.2f}' for v in r['worst_x'])}) | {r['step_ms']:.1f} |"
            for r in multimodal
        ]
    digits = [r for r in rows if r["part"] == "digits"]
    if digits:
        lines += [
            "",
            "| encoder | seeds | test -ELBO | test -log p (IWAE) | gap | params | s/epoch | "
            "ms/step |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for kind in dict.fromkeys(r["encoder"] for r in digits):
            group = [r for r in digits if r["encoder"] == kind]

            def mean_sd(key, group=group):
                values = torch.tensor([r[key] for r in group], dtype=torch.float64)
                sd = values.std().item() if len(values) > 1 else 0.0
                return f"{values.mean().item():.3f} ± {sd:.3f}"

            lines.append(
                f"| {kind} | {len(group)} | {mean_sd('neg_elbo')} | {mean_sd('neg_ll')} | "
                f"{mean_sd('gap')} | {group[0]['params']} | "
                f"{sum(r['epoch_s'] for r in group) / len(group):.2f} | "
                f"{sum(r['step_ms'] for r in group) / len(group):.1f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(
        prog="python -m inference.bench.vae",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--parts", default="multimodal,digits")
    p.add_argument("--encoders", default=",".join(ENCODERS), help="for the digits part")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--steps", type=int, default=2000, help="multimodal part")
    p.add_argument("--epochs", type=int, default=100, help="digits part")
    p.add_argument("--iwae", type=int, default=1000, help="importance samples per test image")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench-out/vae.json")
    args = p.parse_args(argv)
    parts = [s for s in args.parts.split(",") if s]
    if set(parts) - {"multimodal", "digits"}:
        p.error(f"--parts: choose from multimodal, digits; got {args.parts}")
    encoders = [e for e in args.encoders.split(",") if e]
    if set(encoders) - set(ENCODERS):
        p.error(f"--encoders: choose from {','.join(ENCODERS)}; got {args.encoders}")
    seeds = [int(s) for s in args.seeds.split(",") if s]
    if args.steps < 1 or args.epochs < 1 or args.iwae < 1:
        p.error("--steps, --epochs and --iwae must be positive")
    torch.set_num_threads(args.threads)
    rows = []
    for seed in seeds:
        if "multimodal" in parts:
            for task, kinds in (
                ("bimodal", ("normal", "cwm2")),
                ("four-modes", ("normal", "cwm4")),
            ):
                for kind in kinds:
                    rows.append(multimodal_row(task, kind, seed, args.steps))
                    print(json.dumps(rows[-1]), flush=True)
        if "digits" in parts:
            for kind in encoders:
                rows.append(digits_row(kind, seed, args.epochs, args.iwae))
                print(json.dumps(rows[-1]), flush=True)
    print()
    print(summary(rows))
    write_rows(rows, args.out)
    return rows


if __name__ == "__main__":
    main()
