"""The models and the shared training loop of the density benchmarks.

Every gradient-trained model (CWMs and zuko's flows) is fitted by
[`fit_density`][inference.fit_density] with the same options; the Gaussian mixture is fitted
by EM ([`GaussianMixtureEM`][inference.GaussianMixtureEM]) with the CWMs' K. A row of the
table is a dict with ``model``, ``parameters``, ``nll`` (held-out, nats per point),
``epochs`` (run), ``best_epoch`` (1-based epoch of the best validation NLL: the epochs to
converge), ``s_per_epoch`` and ``time_s``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import zuko
from torch import Tensor

from inference import GaussianMixtureEM, em_pretrain, fit_density
from pyro_cwm import CWM


def num_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@dataclass
class Options:
    """Training options shared by every gradient-trained model of a suite."""

    components: int = 16
    epochs: int = 40
    batch_size: int = 512
    lr: float = 3e-3
    classifier_lr: float | None = None  # fit_density's default: 10 * lr
    patience: int = 8
    seed: int = 0

    @classmethod
    def from_args(cls, args, **suite_defaults) -> Options:
        """Options from parsed command-line ``args``; unset ones take ``suite_defaults``."""
        values = {name: getattr(args, name) or default for name, default in suite_defaults.items()}
        return cls(
            classifier_lr=args.classifier_lr, patience=args.patience, seed=args.seed, **values
        )


@dataclass
class Fitted:
    """A fitted model: its row of the table and the module (None for EM) or its density."""

    row: dict
    log_prob: Callable[[Tensor], Tensor]
    module: torch.nn.Module | None = None
    history: dict = field(default_factory=dict)


def build(name: str, dim: int, options: Options) -> torch.nn.Module:
    """The untrained model ``name`` (a key of ``MODELS``) for data of dimension ``dim``."""
    torch.manual_seed(options.seed)
    return MODELS[name](dim, options.components)


MODELS: dict[str, Callable[[int, int], torch.nn.Module]] = {
    "cwm": lambda d, k: CWM(d, k, hidden_dims=(64, 64)),
    "cwm-s": lambda d, k: CWM(d, k, hidden_dims=(32, 32)),
    "cwm-affine": lambda d, k: CWM(d, k, hidden_dims=(64, 64), map="affine"),
    "cwm-flow": lambda d, k: CWM(
        d,
        k,
        hidden_dims=(64, 64),
        map="flow",
        map_options={"transforms": 1, "flow_hidden_dims": (32, 32)},
    ),
    "realnvp-s": lambda d, k: zuko.flows.RealNVP(d, transforms=4, hidden_features=(64, 64)),
    "realnvp-l": lambda d, k: zuko.flows.RealNVP(d, transforms=8, hidden_features=(128, 128)),
    "nsf-s": lambda d, k: zuko.flows.NSF(d, transforms=3, hidden_features=(64, 64)),
    "nsf-l": lambda d, k: zuko.flows.NSF(d, transforms=5, hidden_features=(128, 128)),
    "maf-s": lambda d, k: zuko.flows.MAF(d, transforms=3, hidden_features=(64, 64)),
    "maf-l": lambda d, k: zuko.flows.MAF(d, transforms=5, hidden_features=(128, 128)),
}


def mean_nll(log_prob: Callable[[Tensor], Tensor], data: Tensor, chunk: int = 8192) -> float:
    with torch.no_grad():
        return -torch.cat([log_prob(c) for c in data.split(chunk)]).mean().item()


def fit_gradient(
    name: str,
    train: Tensor,
    test: Tensor,
    options: Options,
    freeze: str | None = None,
    label: str | None = None,
) -> Fitted:
    """Fit ``MODELS[name]`` with [`fit_density`][inference.fit_density] (10% of ``train`` held
    out for early stopping) and score it on ``test``.

    ``freeze`` (``"classifier"`` or ``"maps"``) keeps that part of a CWM at its EM start.
    """
    model = build(name, train.shape[1], options)
    em_start = None
    if hasattr(model, "set_gaussian_mixture"):
        # The same EM start for every CWM variant (fit_density would draw its own).
        em_pretrain(model, train, random_state=options.seed, max_iter=500)
        em_start = mean_nll(lambda x: model().log_prob(x), test)
    if freeze is not None:
        getattr(model, freeze).requires_grad_(False)
    history = fit_density(
        model,
        train,
        epochs=options.epochs,
        batch_size=options.batch_size,
        lr=options.lr,
        classifier_lr=options.classifier_lr,
        patience=options.patience,
        seed=options.seed,
        progress=False,
        em_pretraining=False,
    )
    model.eval()
    log_prob = lambda x: model().log_prob(x)  # noqa: E731
    row = {
        "model": label or name,
        "parameters": num_parameters(model),
        "nll": mean_nll(log_prob, test),
        "epochs": history["epochs"],
        "best_epoch": (history["best_epoch"] or 0) + 1,
        "s_per_epoch": history["time_s"] / history["epochs"],
        "time_s": history["time_s"],
    }
    if em_start is not None:
        row["nll_em_start"] = em_start
    return Fitted(row, log_prob, model, history)


def fit_em(train: Tensor, test: Tensor, options: Options, covariance_type: str = "diag") -> Fitted:
    """The EM Gaussian mixture with the CWMs' K, on the same training points."""
    started = time.perf_counter()
    gm = GaussianMixtureEM(
        options.components,
        covariance_type=covariance_type,
        tol=1e-5,
        max_iter=500,
        random_state=options.seed,
    ).fit(train)
    elapsed = time.perf_counter() - started
    d, k = train.shape[1], options.components
    per = {"diag": 2 * d, "full": d + d * (d + 1) // 2}[covariance_type]
    log_prob = lambda x: torch.as_tensor(gm.score_samples(x))  # noqa: E731
    row = {
        "model": f"gmm-{covariance_type} (EM)",
        "parameters": k * per + k - 1,
        "nll": mean_nll(log_prob, test),
        "epochs": int(gm.n_iter_),
        "best_epoch": int(gm.n_iter_),
        "s_per_epoch": elapsed / max(int(gm.n_iter_), 1),
        "time_s": elapsed,
    }
    return Fitted(row, log_prob)
