r"""FlowGMM: a normalizing flow to a class-conditional Gaussian mixture (Izmailov et al., 2020).

A flow ``f`` (zuko) maps data to a latent space where class ``y`` is the Gaussian
``N(mu_y, I)``:

```text
p(x | y) = N(f(x); mu_y, I) |det df/dx|,
p(x)     = sum_y pi_y p(x | y),
p(y | x) = softmax_y(log pi_y - 1/2 ||f(x) - mu_y||^2).
```

The class means are fixed, not learned, at ``mean_scale`` times orthonormal directions
(every pair ``mean_scale * sqrt(2)`` apart), so the classes cannot collapse onto each other
(what sank the seed's version). The log-determinant is exact (coupling/autoregressive
transforms have triangular Jacobians). [`FlowGMM.model`][pyro_cwm.models.FlowGMM.model] is
the same model in Pyro, with the label observed or enumerated.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
import zuko
from torch import Tensor, nn

from pyro_cwm.distributions.gaussian_mixture import GaussianMixture
from pyro_cwm.nn.checks import check_hidden_dims, check_positive_int

FLOWS = {"nsf": zuko.flows.NSF, "maf": zuko.flows.MAF, "realnvp": zuko.flows.RealNVP}


def separated_means(num_classes: int, dim: int, scale: float, seed: int = 0) -> Tensor:
    """``scale`` times K orthonormal directions of R^d (K <= d), or K random unit vectors.

    Raises:
        ValueError: if ``scale`` is not positive.
    """
    if not scale > 0:
        raise ValueError(f"mean_scale must be > 0, got {scale}")
    g = torch.Generator().manual_seed(seed)
    if num_classes <= dim:
        q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
        return scale * q[:num_classes]
    directions = torch.randn(num_classes, dim, generator=g)
    return scale * directions / directions.norm(dim=-1, keepdim=True)


class FlowGMM(nn.Module):
    """A generative classifier with exact likelihood: a flow to one Gaussian per class.

    Args:
        dim: data dimension d.
        num_classes: K.
        flow: ``"nsf"`` (neural spline, autoregressive), ``"maf"`` or ``"realnvp"``
            (coupling: fast sampling too), from zuko.
        transforms: number of flow transforms.
        hidden_features: widths of each transform's network.
        mean_scale: norm of the fixed class means (pairwise distance ``sqrt(2)`` times it).
        seed: seed of the means' directions.

    Raises:
        ValueError: for a bad size, flow name, widths or scale.
    """

    def __init__(
        self,
        dim: int,
        num_classes: int,
        flow: str = "nsf",
        transforms: int = 4,
        hidden_features: tuple[int, ...] = (256, 256),
        mean_scale: float = 16.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_positive_int("dim", dim)
        check_positive_int("num_classes", num_classes)
        check_positive_int("transforms", transforms)
        hidden_features = check_hidden_dims(hidden_features, "hidden_features")
        if flow not in FLOWS:
            raise ValueError(f"flow must be one of {sorted(FLOWS)}, got {flow!r}")
        self.dim, self.num_classes = dim, num_classes
        self.config_ = {
            "dim": dim, "num_classes": num_classes, "flow": flow, "transforms": transforms,
            "hidden_features": tuple(hidden_features), "mean_scale": mean_scale, "seed": seed,
        }
        self.flow = FLOWS[flow](dim, transforms=transforms, hidden_features=hidden_features)
        self.register_buffer("means", separated_means(num_classes, dim, mean_scale, seed))
        self.register_buffer("class_logits", torch.zeros(num_classes))

    def config(self) -> dict:
        """Constructor arguments, to rebuild the module before ``load_state_dict``."""
        return dict(self.config_)

    @torch.no_grad()
    def set_class_weights(self, weights: Tensor) -> None:
        """Set the class prior pi (K,), e.g. to the label frequencies."""
        weights = torch.as_tensor(weights, dtype=self.class_logits.dtype)
        if weights.shape != (self.num_classes,) or not (weights > 0).all():
            raise ValueError(f"weights must be {self.num_classes} positive numbers")
        self.class_logits.copy_((weights / weights.sum()).log())

    def transform(self) -> torch.distributions.Transform:
        """The flow f: data -> latent, a torch ``Transform`` with ``call_and_ladj``."""
        return self.flow().transform

    def latent(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(f(x), log|det df/dx|)``: shapes (..., d) and (...)."""
        self._check(x, "x")
        return self.transform().call_and_ladj(x)

    def _check(self, x: Tensor, name: str) -> None:
        if not isinstance(x, Tensor) or x.dim() < 1 or x.shape[-1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{name} must be a tensor of shape (..., {self.dim}), got {shape}")
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} contains NaN or inf")

    def latent_mixture(self) -> GaussianMixture:
        """The mixture in the latent space: ``sum_y pi_y N(mu_y, I)``."""
        return GaussianMixture(
            self.means, torch.ones((), dtype=self.means.dtype, device=self.means.device),
            "constant", logits=self.class_logits,
        )

    def joint_log_probs(self, x: Tensor) -> Tensor:
        """``log pi_y + log p(x | y)`` for every class: shape (..., K)."""
        z, ladj = self.latent(x)
        mixture = self.latent_mixture()
        return mixture.logits + mixture.component_log_probs(z) + ladj.unsqueeze(-1)

    def log_prob(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """``log p(x)`` (y None) or ``log p(x, y)`` for labels ``y`` (...): shape (...)."""
        joint = self.joint_log_probs(x)
        if y is None:
            return torch.logsumexp(joint, -1)
        self._check_labels(y, joint.shape[:-1])
        return joint.gather(-1, y.long().unsqueeze(-1)).squeeze(-1)

    def _check_labels(self, y: Tensor, shape: torch.Size) -> None:
        if y.shape != shape:
            raise ValueError(f"y must have shape {tuple(shape)}, got {tuple(y.shape)}")
        if y.numel() and (y.min() < 0 or y.max() >= self.num_classes):
            raise ValueError(
                f"labels must be in [0, {self.num_classes}), got {int(y.min())}..{int(y.max())}"
            )

    def predict_proba(self, x: Tensor) -> Tensor:
        """``p(y | x)`` by Bayes' rule: shape (..., K), rows summing to one."""
        return torch.softmax(self.joint_log_probs(x), -1)

    def predict(self, x: Tensor) -> Tensor:
        """The most probable class of every point: shape (...)."""
        return self.joint_log_probs(x).argmax(-1)

    def bits_per_dim(self, x: Tensor) -> Tensor:
        """``-log2 p(x) / d`` per point (in the space of ``x``)."""
        return -self.log_prob(x) / (self.dim * math.log(2))

    def class_distribution(self, y: Tensor) -> torch.distributions.Distribution:
        """``p(x | y)`` as a torch distribution of batch shape ``y.shape``."""
        base = dist.Normal(self.means[y.long()], 1.0).to_event(1)
        return dist.TransformedDistribution(base, [self.transform().inv])

    @torch.no_grad()
    def sample(self, num_samples: int, y: Tensor | int | None = None) -> tuple[Tensor, Tensor]:
        """Draw ``(x, y)``: ``num_samples`` points (n, d), of class ``y`` when given.

        ``y`` may be one label or a tensor of ``num_samples`` labels; None draws the classes
        from pi.
        """
        check_positive_int("num_samples", num_samples)
        device = self.means.device
        if y is None:
            y = torch.distributions.Categorical(logits=self.class_logits).sample((num_samples,))
        y = torch.as_tensor(y, device=device).long().expand(num_samples)
        self._check_labels(y, torch.Size((num_samples,)))
        noise = torch.randn(num_samples, self.dim, device=device, dtype=self.means.dtype)
        z = self.means[y] + noise
        return self.transform().inv(z), y

    def model(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """The same model in Pyro: ``y ~ Categorical(pi)`` (observed or enumerated), ``x | y``.

        With ``y=None`` the label site is marked for parallel enumeration, so
        ``TraceEnum_ELBO`` or ``infer_discrete`` sum or sample it out.
        """
        self._check(x, "x")
        pyro.module("flow_gmm", self)
        with pyro.plate("data", x.shape[0]):
            label = pyro.sample(
                "y",
                dist.Categorical(logits=self.class_logits),
                obs=y,
                infer={"enumerate": "parallel"},
            )
            pyro.sample("x", self.class_distribution(label), obs=x)
        return label
