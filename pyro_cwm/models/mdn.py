r"""Mixture density network: a network maps x to a Gaussian mixture over y (Bishop, 1994).

```text
p(y | x) = sum_{k=1}^K pi_k(x) N(y; mu_k(x), Sigma_k(x)),
(pi, mu, S) = f_theta(x),   Sigma_k = S_k S_k^T + s_min^2 I
```

The network ``f`` is an MLP trunk followed by one linear layer giving the logits of
``pi``, the K means and the noise parameters of the chosen type:

| ``noise_type``                    | ``Sigma_k(x)``              | ``GaussianMixture`` family    |
| --------------------------------- | --------------------------- | ----------------------------- |
| ``"full"``                        | ``L_k L_k^T + s^2 I``       | ``full`` (Cholesky factor)    |
| ``"diagonal"``                    | ``diag(sigma_k^2 + s^2)``   | ``diag``                      |
| ``"isotropic"``                   | ``(sigma_k^2 + s^2) I``     | ``spherical``                 |
| ``"isotropic_across_components"`` | ``(sigma^2 + s^2) I``       | ``constant`` (batched)        |
| ``"fixed"``                       | ``c^2 I``, not learned      | ``constant``                  |

with ``s`` = ``min_scale``, the variance floor: every eigenvalue of every ``Sigma_k`` is
at least ``s^2`` whatever the network outputs (exactly for the diagonal types; for
``"full"`` up to rounding relative to the largest eigenvalue). The log-scales are clamped
at ``MAX_LOG_SCALE``, so nothing overflows for extreme inputs.

Calling the module returns the distribution (the lazy-distribution pattern of
[`CWM`][pyro_cwm.nn.CWM] and zuko), so ``inference.fit_density(mdn, y, context=x)`` trains
it.
``mdn.model(x, y)`` is the Pyro model with the MDN as likelihood; after
[`MixtureDensityNetwork.set_weight_prior`][pyro_cwm.models.MixtureDensityNetwork.set_weight_prior]
the network weights are latent too (a Bayesian MDN, fitted with SVI and any autoguide).
With ``head="cwm"`` the trunk's features are the context of a conditional
[`CWM`][pyro_cwm.nn.CWM] instead of the Gaussian mixture parameters: the same calls return a
Classifier Weighted Mixture over y.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroSample
from pyro.nn.module import to_pyro_module_
from torch import Size, Tensor, nn

from pyro_cwm.distributions.cwm import ClassifierWeightedMixture
from pyro_cwm.distributions.gaussian_mixture import GaussianMixture
from pyro_cwm.nn.checks import check_hidden_dims, check_positive_int
from pyro_cwm.nn.cwm import CWM

NOISE_TYPES = ("full", "diagonal", "isotropic", "isotropic_across_components", "fixed")
HEADS = ("gaussian", "cwm")

_FAMILY = {
    "full": "full",
    "diagonal": "diag",
    "isotropic": "spherical",
    "isotropic_across_components": "constant",
    "fixed": "constant",
}
_CWM_MAP = {"diagonal": "location_scale", "full": "affine"}
# Log-scales are clamped here: sigma <= e^30 keeps sigma^2 finite even in float32.
MAX_LOG_SCALE = 30.0


def _non_negative_float(name: str, value: float, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    ok = value > 0 if positive else value >= 0
    if not (math.isfinite(value) and ok):
        relation = ">" if positive else ">="
        raise ValueError(f"{name} must be a finite number {relation} 0, got {value}")
    return float(value)


def _check_tensor(name: str, value: Any, width: int, width_name: str) -> Tensor:
    """``value`` as a real tensor of shape (..., width) with finite entries, else raise."""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{name} must be a real tensor, got dtype {value.dtype}")
    if value.dim() < 1 or value.shape[-1] != width:
        raise ValueError(
            f"{name} must have shape (..., {width}) ({width_name}={width}), "
            f"got {tuple(value.shape)}"
        )
    if value.is_floating_point() and not torch.isfinite(value).all():
        raise ValueError(f"{name} contains NaN or inf")
    return value


class MixtureDensityNetwork(PyroModule):
    r"""A mixture density network ``x -> p(y | x)``, a Gaussian mixture (or a CWM) over y.

    Args:
        input_dim: dimension of the covariates x.
        output_dim: dimension d of the response y.
        num_components: number of mixture components K.
        hidden_dims: widths of the trunk's hidden layers; ``()``: the head sees x itself.
        noise_type: ``"full"``, ``"diagonal"``, ``"isotropic"``,
            ``"isotropic_across_components"`` or ``"fixed"`` (see
            [the module documentation][pyro_cwm.models.mdn]).
        fixed_scale: the standard deviation c of the ``"fixed"`` type (required there,
            not allowed otherwise).
        min_scale: the floor s >= 0: every component covariance is
            ``S S^T + s^2 I``, so no variance falls below ``s^2`` (learned types only).
        head: ``"gaussian"`` (the MDN) or ``"cwm"``: the trunk's features are the context
            of a conditional [`CWM`][pyro_cwm.nn.CWM] with K components, whose maps are
            ``"location_scale"`` for ``noise_type="diagonal"`` and ``"affine"`` for
            ``"full"`` (other types raise).
        cwm_options: keyword arguments of [`CWM`][pyro_cwm.nn.CWM] for the ``"cwm"`` head
            (``hidden_dims``, ``map``, ``map_options``).
        activation: the trunk's activation module class.

    Shapes: ``mdn(x)`` with x of shape ``(*batch, input_dim)`` is a distribution with batch
    shape ``batch`` and event shape (output_dim,); ``log_prob(y, x)`` has shape
    ``broadcast(y.shape[:-1], x.shape[:-1])``; ``sample(x, sample_shape)`` has shape
    ``(*sample_shape, *batch, output_dim)``.

    Raises:
        TypeError, ValueError: for dimensions or K below 1, an unknown ``noise_type`` or
            ``head``, a negative ``min_scale``, a missing, non-positive or unexpected
            ``fixed_scale``, or a noise type the CWM head cannot express.
    """

    def __init__(
        self,
        input_dim: int,
        output_dim: int,
        num_components: int,
        hidden_dims: Sequence[int] = (64,),
        noise_type: str = "diagonal",
        fixed_scale: float | None = None,
        min_scale: float = 1e-3,
        head: str = "gaussian",
        cwm_options: dict[str, Any] | None = None,
        activation: type[nn.Module] = nn.ELU,
    ) -> None:
        super().__init__()
        self.input_dim = check_positive_int("input_dim", input_dim)
        self.output_dim = check_positive_int("output_dim", output_dim)
        self.num_components = check_positive_int("num_components", num_components)
        self.hidden_dims = check_hidden_dims(hidden_dims)
        if noise_type not in NOISE_TYPES:
            raise ValueError(f"noise_type must be one of {NOISE_TYPES}, got {noise_type!r}")
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        self.noise_type, self.head_type = noise_type, head
        if noise_type == "fixed":
            if fixed_scale is None:
                raise ValueError("noise_type='fixed' needs fixed_scale, the noise's std")
            fixed_scale = _non_negative_float("fixed_scale", fixed_scale, positive=True)
        elif fixed_scale is not None:
            raise ValueError(
                f"fixed_scale is only used with noise_type='fixed', not {noise_type!r}"
            )
        self.min_scale = _non_negative_float("min_scale", min_scale)
        self.fixed_scale = fixed_scale
        self.cwm_options = dict(cwm_options or {})
        # The scales are Python floats (exact in any dtype); the buffers below follow
        # .to(device, dtype) and tell the module's dtype and device.
        self._log_min_scale = math.log(self.min_scale) if self.min_scale > 0 else -math.inf
        # The network sees (x - input_loc) / input_scale; see standardize_inputs.
        self.register_buffer("input_loc", torch.zeros(input_dim))
        self.register_buffer("input_scale", torch.ones(input_dim))

        layers: list[nn.Module] = []
        width = input_dim
        for h in self.hidden_dims:
            layers += [nn.Linear(width, h), activation()]
            width = h
        self.trunk = nn.Sequential(*layers)
        self.feature_dim = width
        if head == "cwm":
            if cwm_options and "context_dim" in cwm_options:
                raise ValueError("cwm_options must not set context_dim (the trunk's width)")
            if "map" not in self.cwm_options and noise_type not in _CWM_MAP:
                raise ValueError(
                    f"the cwm head has noise_type 'diagonal' or 'full', got {noise_type!r}"
                )
            # The trunk's inputs are standardized (standardize_inputs), not its features.
            options = {
                "map": _CWM_MAP.get(noise_type),
                "standardize_context": False,
                **self.cwm_options,
            }
            self.head = CWM(output_dim, num_components, context_dim=width, **options)
            # The CWM starts with K identical components and uniform weights, a symmetric
            # point that gradients never leave: randomize the maps' last layer.
            for module in self.head.maps.modules():
                if isinstance(module, nn.Sequential) and isinstance(module[-1], nn.Linear):
                    nn.init.normal_(module[-1].weight, std=0.5 / math.sqrt(width))
                    nn.init.normal_(module[-1].bias, std=0.5)
        else:
            self.head = nn.Linear(width, self._num_head_outputs())
        self._bayesian = False

    # fit_density reads these to check the data's and the context's widths.
    @property
    def dim(self) -> int:
        return self.output_dim

    @property
    def context_dim(self) -> int:
        return self.input_dim

    def _num_head_outputs(self) -> int:
        K, d = self.num_components, self.output_dim
        scales = {
            "full": K * d * (d + 1) // 2,
            "diagonal": K * d,
            "isotropic": K,
            "isotropic_across_components": 1,
            "fixed": 0,
        }[self.noise_type]
        return K + K * d + scales

    def config(self) -> dict[str, Any]:
        """The constructor arguments (activation aside), to rebuild the module."""
        return {
            "input_dim": self.input_dim,
            "output_dim": self.output_dim,
            "num_components": self.num_components,
            "hidden_dims": list(self.hidden_dims),
            "noise_type": self.noise_type,
            "fixed_scale": self.fixed_scale,
            "min_scale": self.min_scale,
            "head": self.head_type,
            "cwm_options": self.cwm_options,
        }

    def _floored_scale(self, raw: Tensor) -> Tensor:
        """``sqrt(exp(2 raw) + s^2)``: a standard deviation whose square is >= s^2.

        ``raw`` is a log-scale (better conditioned for gradient descent than a softplus),
        clamped at ``MAX_LOG_SCALE`` so that no input overflows it.
        """
        floor = raw.new_tensor(2 * self._log_min_scale)
        log_var = torch.logaddexp(2 * raw.clamp(max=MAX_LOG_SCALE), floor)
        return torch.exp(0.5 * log_var)

    def _full_scale(self, raw: Tensor) -> Tensor:
        """Cholesky factor of ``L L^T + s^2 I`` from raw (..., K, d(d+1)/2) entries of L.

        The diagonal of L is ``exp(raw)`` (clamped as in ``_floored_scale``), the
        entries below it are ``raw`` itself.
        """
        d = self.output_dim
        rows, cols = torch.tril_indices(d, d, device=raw.device)
        on_diag = rows == cols
        entries = torch.where(on_diag, raw.clamp(max=MAX_LOG_SCALE).exp(), raw)
        tril = raw.new_zeros(*raw.shape[:-1], d * d)
        tril[..., rows * d + cols] = entries
        tril = tril.unflatten(-1, (d, d))
        if self.min_scale == 0:
            return tril
        # The Cholesky factor of L L^T + s^2 I = A^T A for A = [L^T; s I], from the QR
        # decomposition of A: no squaring, so it never fails however large L is.
        eye = torch.eye(d, dtype=raw.dtype, device=raw.device)
        stacked = torch.cat((tril.mT, (self.min_scale * eye).expand_as(tril)), dim=-2)
        r = torch.linalg.qr(stacked, mode="reduced").R
        sign = torch.where(r.diagonal(dim1=-2, dim2=-1) < 0, -1.0, 1.0).to(r.dtype)
        return (sign.unsqueeze(-1) * r).mT

    def check_x(self, x: Tensor) -> Tensor:
        """``x`` as a finite tensor (..., input_dim) of the module's dtype, else raise."""
        x = _check_tensor("x", x, self.input_dim, "input_dim")
        return x.to(device=self.input_loc.device, dtype=self.input_loc.dtype)

    def check_y(self, y: Tensor, x: Tensor) -> Tensor:
        """``y`` as a finite tensor (..., output_dim) whose rows match ``x``'s, else raise."""
        y = _check_tensor("y", y, self.output_dim, "output_dim")
        try:
            torch.broadcast_shapes(y.shape[:-1], x.shape[:-1])
        except RuntimeError:
            raise ValueError(
                f"y and x must have matching leading dims (one row of y per row of x): "
                f"y has shape {tuple(y.shape)}, x has shape {tuple(x.shape)}"
            ) from None
        return y.to(device=self.input_loc.device, dtype=self.input_loc.dtype)

    def forward(self, x: Tensor) -> GaussianMixture | ClassifierWeightedMixture:
        """The distribution ``p(y | x)``: batch shape ``x.shape[:-1]``, event (output_dim,).

        Raises:
            TypeError, ValueError: if ``x`` is not a real tensor of shape (..., input_dim)
                with finite entries.
        """
        x = self.check_x(x)
        features = self.trunk((x - self.input_loc) / self.input_scale)
        if self.head_type == "cwm":
            return self.head(features)
        K, d = self.num_components, self.output_dim
        out = self.head(features)
        logits, loc, raw = out.split((K, K * d, out.shape[-1] - K - K * d), dim=-1)
        loc = loc.unflatten(-1, (K, d))
        if self.noise_type == "full":
            scale = self._full_scale(raw.unflatten(-1, (K, d * (d + 1) // 2)))
        elif self.noise_type == "diagonal":
            scale = self._floored_scale(raw.unflatten(-1, (K, d)))
        elif self.noise_type == "isotropic":
            scale = self._floored_scale(raw)  # (..., K): one sigma per component
        elif self.noise_type == "isotropic_across_components":
            scale = self._floored_scale(raw.squeeze(-1))  # (...): one sigma per x
        else:
            scale = x.new_full(x.shape[:-1], self.fixed_scale)
        return GaussianMixture(loc, scale, _FAMILY[self.noise_type], logits=logits)

    @torch.no_grad()
    def standardize_inputs(self, x: Tensor) -> MixtureDensityNetwork:
        """Feed the network ``(x - mean) / std`` with the mean and std of these covariates.

        Gradient descent on an MDN is much less prone to stall in the one-broad-Gaussian
        optimum when its inputs are standardized; call this once with the training
        covariates (N, input_dim) before fitting. The shift and scale are buffers (saved in
        the ``state_dict``); the model stays a density over y given the raw x. Returns the
        module.

        Raises:
            TypeError, ValueError: for ``x`` not (..., input_dim), non-finite, or with
                fewer than two rows.
        """
        x = self.check_x(x).reshape(-1, self.input_dim)
        if x.shape[0] < 2:
            raise ValueError(f"x must have at least 2 rows to standardize, got {x.shape[0]}")
        std = x.std(dim=0)
        self.input_loc.copy_(x.mean(dim=0))
        self.input_scale.copy_(torch.where(std > 0, std, torch.ones_like(std)))
        return self

    def log_prob(self, y: Tensor, x: Tensor) -> Tensor:
        """``log p(y | x)``, shape ``broadcast(y.shape[:-1], x.shape[:-1])``.

        Raises:
            TypeError, ValueError: for tensors of the wrong width, non-finite entries, or
                leading dims of ``y`` and ``x`` that do not match (broadcast).
        """
        x = self.check_x(x)
        return self(x).log_prob(self.check_y(y, x))

    def sample(self, x: Tensor, sample_shape: Size | Sequence[int] = Size()) -> Tensor:
        """Draw y ~ p(y | x): shape (*sample_shape, *x.shape[:-1], output_dim), no gradient.

        Raises:
            TypeError, ValueError: as [`forward`][pyro_cwm.models.MixtureDensityNetwork.forward].
        """
        with torch.no_grad():
            return self(x).sample(Size(sample_shape))

    def model(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """The Pyro model ``y_n ~ p(y | x_n)`` for N rows ``x`` (N, input_dim): site ``"y"``.

        With [`set_weight_prior`][pyro_cwm.models.MixtureDensityNetwork.set_weight_prior]
        the weights are sampled first (a Bayesian MDN):
        ``SVI(mdn.model, AutoNormal(mdn.model), ...)`` approximates their posterior and
        ``Predictive(mdn.model, guide=guide, num_samples=S)(x)`` samples the predictive.

        Raises:
            TypeError, ValueError: for ``x`` not (N, input_dim), ``y`` not (N, output_dim),
                or non-finite entries.
        """
        x = self.check_x(x)
        if x.dim() != 2:
            raise ValueError(f"x must have shape (N, {self.input_dim}), got {tuple(x.shape)}")
        if y is not None:
            y = self.check_y(y, x)
            if y.shape != (x.shape[0], self.output_dim):
                raise ValueError(
                    f"y must have shape ({x.shape[0]}, {self.output_dim}) to match x, "
                    f"got {tuple(y.shape)}"
                )
        likelihood = self(x)  # outside the plate: weight sites are global
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("y", likelihood, obs=y)

    def set_weight_prior(self, scale: float = 1.0) -> MixtureDensityNetwork:
        """Make every network weight latent with prior N(0, scale^2): a Bayesian MDN.

        The parameters become ``pyro.nn.PyroSample`` sites named by their module path
        (``"trunk.0.weight"``, ``"head.bias"``, ...), drawn anew on every call of the
        module; fit them with SVI on [`model`][pyro_cwm.models.MixtureDensityNetwork.model].
        Returns the module.

        Raises:
            ValueError: for a non-positive ``scale``, the ``"cwm"`` head (its distribution
                evaluates its networks lazily, outside the call that samples weights), or
                a module that already has a prior.
        """
        scale = _non_negative_float("scale", scale, positive=True)
        if self.head_type != "gaussian":
            raise ValueError("set_weight_prior needs head='gaussian'")
        if self._bayesian:
            raise ValueError("the weights already have a prior")
        to_pyro_module_(self)  # the submodules become PyroModules named by their path
        for module in (self.trunk, self.head):
            for sub in module.modules():
                for name, param in list(sub.named_parameters(recurse=False)):
                    prior = dist.Normal(
                        torch.zeros_like(param.detach()), torch.full_like(param.detach(), scale)
                    ).to_event(param.dim())
                    setattr(sub, name, PyroSample(prior))
        self._bayesian = True
        return self
