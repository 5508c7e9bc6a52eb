"""The Bayesian Gaussian mixture as a Pyro model, with assignments marginalized by enumeration.

Generative process for K components in d dimensions and N points:

    w ~ Dirichlet(alpha 1_K)                        site "weights" (K,)
    for k = 1..K:                                   plate "components"
        mu_k ~ Normal(m, tau^2 I_d)                 site "locs" (K, d)
        sigma_k ~ HalfCauchy(s) per coordinate      site "scales" (K, d)
        L_k ~ LKJCholesky(d, eta)                   site "corr_cholesky" (K, d, d), full, d > 1
        Sigma_k = diag(sigma_k) L_k L_k^T diag(sigma_k)   (diag: Sigma_k = diag(sigma_k^2))
    for n = 1..N:                                   plate "data"
        z_n ~ Categorical(w)                        site "assignment", enumerated in parallel
        x_n ~ Normal(mu_{z_n}, Sigma_{z_n})         site "obs" (N, d)

``TraceEnum_ELBO``, ``NUTS`` and ``infer_discrete`` sum the assignment out exactly, so the
globals see the marginal likelihood ``prod_n sum_k w_k N(x_n | mu_k, Sigma_k)``. How the
model is fitted (SVI, NUTS, MAP-EM, label alignment) lives in ``inference.bayesian_gmm``.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro.ops.indexing import Vindex
from torch import Tensor

from pyro_cwm.nn.checks import check_positive_int

COVARIANCE_TYPES = ("full", "diag")


def _positive_float(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


class BayesianGMM:
    """A Bayesian Gaussian mixture model; ``model(data)`` runs it as a Pyro model.

    Args:
        num_components: K >= 1.
        dim: d >= 1, the dimension of the data.
        covariance: ``"full"`` (HalfCauchy scales and an LKJ prior on the correlation
            Cholesky factor) or ``"diag"`` (HalfCauchy scales only). With d = 1 both are the
            same model and no ``"corr_cholesky"`` site is sampled.
        concentration: alpha > 0 of the symmetric Dirichlet prior on the weights.
        loc_mean: m, the prior mean of every component mean (a float or a tensor of
            shape (d,)).
        loc_scale: tau > 0, the prior standard deviation of every mean coordinate.
        scale_scale: s > 0, the scale of the HalfCauchy prior on each standard deviation.
        lkj_concentration: eta > 0 of the LKJ prior (eta = 1: uniform over correlations,
            larger: closer to the identity).

    Site shapes (unbatched): ``weights`` (K,), ``locs`` (K, d), ``scales`` (K, d),
    ``corr_cholesky`` (K, d, d), ``assignment`` (N,), ``obs`` (N, d).

    Raises:
        TypeError, ValueError: for an argument of the wrong type or out of range.
    """

    #: Latent sites that carry the component index, and the number of dimensions right of it.
    COMPONENT_SITES = {"weights": 0, "locs": 1, "scales": 1, "corr_cholesky": 2}

    def __init__(
        self,
        num_components: int,
        dim: int,
        covariance: str = "full",
        *,
        concentration: float = 1.0,
        loc_mean: float | Tensor = 0.0,
        loc_scale: float = 10.0,
        scale_scale: float = 2.5,
        lkj_concentration: float = 2.0,
    ) -> None:
        self.num_components = check_positive_int("num_components", num_components)
        self.dim = check_positive_int("dim", dim)
        if covariance not in COVARIANCE_TYPES:
            raise ValueError(f"covariance must be one of {COVARIANCE_TYPES}, got {covariance!r}")
        self.covariance = covariance
        self.concentration = _positive_float("concentration", concentration)
        self.loc_scale = _positive_float("loc_scale", loc_scale)
        self.scale_scale = _positive_float("scale_scale", scale_scale)
        self.lkj_concentration = _positive_float("lkj_concentration", lkj_concentration)
        loc_mean = torch.as_tensor(loc_mean, dtype=torch.float64)
        if loc_mean.dim() > 1 or (loc_mean.dim() == 1 and loc_mean.shape[0] != dim):
            raise ValueError(
                f"loc_mean must be a float or have shape ({dim},), "
                f"got shape {tuple(loc_mean.shape)}"
            )
        if not torch.isfinite(loc_mean).all():
            raise ValueError("loc_mean must be finite")
        self.loc_mean = loc_mean.expand(dim).clone()

    @property
    def has_correlations(self) -> bool:
        """True when the model samples a ``"corr_cholesky"`` site (full covariance, d > 1)."""
        return self.covariance == "full" and self.dim > 1

    @property
    def global_sites(self) -> tuple[str, ...]:
        """Names of the continuous latent sites, in the order the model samples them."""
        sites = ("weights", "locs", "scales")
        return sites + (("corr_cholesky",) if self.has_correlations else ())

    def __repr__(self) -> str:
        return (
            f"BayesianGMM(num_components={self.num_components}, dim={self.dim}, "
            f"covariance={self.covariance!r})"
        )

    # ----------------------------------------------------------------------- checks

    def check_data(self, data) -> Tensor:
        """Return ``data`` as a floating tensor of shape (N, d), or raise naming ``data``.

        Raises:
            TypeError: if ``data`` is not a floating tensor.
            ValueError: if its shape is not (N, d) with N >= 1, or it holds NaN or inf.
        """
        if not isinstance(data, Tensor) or not data.is_floating_point():
            raise TypeError(f"data must be a floating torch.Tensor, got {type(data).__name__}")
        if data.dim() != 2 or data.shape[1] != self.dim or data.shape[0] < 1:
            raise ValueError(
                f"data must have shape (num_points, {self.dim}), got {tuple(data.shape)}"
            )
        finite = torch.isfinite(data).all(-1)
        if not finite.all():
            row = int((~finite).nonzero()[0])
            raise ValueError(f"data contains NaN or inf (first at row {row})")
        return data

    # ----------------------------------------------------------------------- priors

    def priors(self, dtype=None, device=None) -> dict[str, dist.Distribution]:
        """The prior of each global site (in ``dtype``, on ``device``), batched over components.

        ``weights``: Dirichlet, event (K,); ``locs``, ``scales``: batch (K,), event (d,);
        ``corr_cholesky`` (only if
        [`has_correlations`][pyro_cwm.models.BayesianGMM.has_correlations]): batch (K,),
        event (d, d).
        """
        dtype = dtype or torch.get_default_dtype()
        options = {"dtype": dtype, "device": device}
        K, d = self.num_components, self.dim
        priors = {
            "weights": dist.Dirichlet(torch.full((K,), self.concentration, **options)),
            "locs": dist.Normal(
                self.loc_mean.to(**options), torch.tensor(self.loc_scale, **options)
            )
            .expand([K, d])
            .to_event(1),
            "scales": dist.HalfCauchy(torch.tensor(self.scale_scale, **options))
            .expand([K, d])
            .to_event(1),
        }
        if self.has_correlations:
            priors["corr_cholesky"] = dist.LKJCholesky(
                d, torch.tensor(self.lkj_concentration, **options)
            ).expand([K])
        return priors

    def scale_tril(self, params: dict[str, Tensor]) -> Tensor:
        """Cholesky factors ``diag(sigma_k) L_k`` of the covariances: shape (..., K, d, d)."""
        scales = params["scales"]
        if self.has_correlations:
            return scales.unsqueeze(-1) * params["corr_cholesky"]
        return torch.diag_embed(scales)

    def component_distribution(self, params: dict[str, Tensor]) -> dist.Distribution:
        """The K Gaussians: batch shape (..., K), event shape (d,)."""
        if self.has_correlations:
            return dist.MultivariateNormal(params["locs"], scale_tril=self.scale_tril(params))
        return dist.Normal(params["locs"], params["scales"]).to_event(1)

    # ----------------------------------------------------------------------- the model

    def __call__(self, data: Tensor | None = None, num_points: int | None = None) -> Tensor:
        """Run the model; ``data`` (N, d) is observed, ``data=None`` draws ``num_points``.

        Returns the observations (N, d) (the data, or the prior predictive draws). Tensors
        are created in the dtype and on the device of ``data`` (torch's default dtype for
        ``data=None``).

        Raises:
            TypeError: if ``data`` is not a floating tensor.
            ValueError: if neither or conflicting ``data``/``num_points`` are given, or the
                data are not of shape (N, d) or not finite.
        """
        if data is None:
            if num_points is None:
                raise ValueError("num_points is required when data is None")
            num_points = check_positive_int("num_points", num_points)
            options = {"dtype": torch.get_default_dtype()}
        else:
            data = self.check_data(data)
            if num_points is not None and num_points != data.shape[0]:
                raise ValueError(
                    f"num_points ({num_points}) differs from the number of rows of data "
                    f"({data.shape[0]})"
                )
            num_points = data.shape[0]
            options = {"dtype": data.dtype, "device": data.device}
        priors = self.priors(**options)
        params = {"weights": pyro.sample("weights", priors["weights"])}
        with pyro.plate("components", self.num_components, dim=-1):
            params["locs"] = pyro.sample("locs", priors["locs"])
            params["scales"] = pyro.sample("scales", priors["scales"])
            if self.has_correlations:
                params["corr_cholesky"] = pyro.sample("corr_cholesky", priors["corr_cholesky"])
        with pyro.plate("data", num_points, dim=-1):
            # Under a vectorizing plate (Predictive(parallel=True)) the weights, outside any
            # model plate, already carry a size-1 dim here; the component sites get one from
            # the unsqueeze, so that the gathers broadcast with the data and enumeration dims.
            assignment = pyro.sample(
                "assignment",
                dist.Categorical(params["weights"]),
                infer={"enumerate": "parallel"},
            )
            locs = Vindex(params["locs"].unsqueeze(-3))[..., assignment, :]
            if self.has_correlations:
                tril = Vindex(self.scale_tril(params).unsqueeze(-4))[..., assignment, :, :]
                likelihood = dist.MultivariateNormal(locs, scale_tril=tril)
            else:
                scales = Vindex(params["scales"].unsqueeze(-3))[..., assignment, :]
                likelihood = dist.Normal(locs, scales).to_event(1)
            return pyro.sample("obs", likelihood, obs=data)

    # ----------------------------------------------------------------------- exact math

    def check_params(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """Check that ``params`` holds every global site with trailing shape as the model's.

        Raises:
            ValueError: naming the first missing or wrongly shaped site.
        """
        K, d = self.num_components, self.dim
        shapes = {"weights": (K,), "locs": (K, d), "scales": (K, d), "corr_cholesky": (K, d, d)}
        for name in self.global_sites:
            if name not in params:
                raise ValueError(f"params is missing the site {name!r}")
            value = params[name]
            if tuple(value.shape[value.dim() - len(shapes[name]) :]) != shapes[name]:
                raise ValueError(
                    f"params[{name!r}] must have trailing shape {shapes[name]}, got "
                    f"{tuple(value.shape)}"
                )
        return params

    def joint_log_probs(self, data: Tensor, params: dict[str, Tensor]) -> Tensor:
        """``log w_k + log N(x_n | mu_k, Sigma_k)``: shape (..., N, K) for params batched (...)."""
        data = self.check_data(data)
        self.check_params(params)
        # Components with batch (..., 1, K) against points of shape (N, 1, d).
        widened = {
            name: params[name].unsqueeze(-2 - self.COMPONENT_SITES[name])
            for name in self.global_sites
        }
        log_lik = self.component_distribution(widened).log_prob(data.unsqueeze(-2))
        return log_lik + widened["weights"].log()

    def responsibilities(self, data: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Exact ``p(z_n = k | x_n, params)`` by Bayes' rule: shape (..., N, K)."""
        return self.joint_log_probs(data, params).softmax(-1)

    def log_likelihood(self, data: Tensor, params: dict[str, Tensor]) -> Tensor:
        """``sum_n log sum_k w_k N(x_n | mu_k, Sigma_k)``: shape (...)."""
        return self.joint_log_probs(data, params).logsumexp(-1).sum(-1)

    def log_prior(self, params: dict[str, Tensor]) -> Tensor:
        """``log p(params)`` as the model's sites score it (no Jacobians): shape (...)."""
        self.check_params(params)
        ref = params["locs"]
        priors = self.priors(dtype=ref.dtype, device=ref.device)
        total = priors["weights"].log_prob(params["weights"])
        for name in self.global_sites[1:]:
            total = total + priors[name].log_prob(params[name]).sum(-1)
        return total

    def log_joint(self, data: Tensor, params: dict[str, Tensor]) -> Tensor:
        """The unnormalized log posterior ``log p(data, params)``, assignments summed out.

        This is what MAP estimation maximizes (in the constrained parametrization, as an
        ``AutoDelta`` guide does) and what NUTS samples from. Shape (...).
        """
        return self.log_prior(params) + self.log_likelihood(data, params)
