"""The mixture that combines K experts and a gate into ``p(y | x)``.

[`MixtureOfExperts`][pyro_cwm.models.MixtureOfExperts] holds an
[`Experts`][pyro_cwm.models.Experts] module (``mixture_of_experts.experts``) and a
[`Gate`][pyro_cwm.models.Gate] (``mixture_of_experts.gates``), predicts with them and writes
them as one Pyro model; [`MixtureOfModels`][pyro_cwm.models.MixtureOfModels] is the one with
constant Dirichlet weights; ``check_regression_data`` checks ``(X, Y)``. The model and its
lower bound: [`pyro_cwm.models.mixture_of_experts`][pyro_cwm.models.mixture_of_experts].
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.ops.indexing import Vindex
from torch import Tensor, nn

from pyro_cwm.models.mixture_of_experts.experts import (
    BayesianLinearExperts,
    Experts,
    PriorMeanRegularizer,
)
from pyro_cwm.models.mixture_of_experts.gates import (
    DirichletGate,
    Gate,
    PerSampleDirichletGate,
    SoftmaxGate,
)
from pyro_cwm.models.point_sums import point_sums
from pyro_cwm.nn.checks import check_positive_int

__all__ = ["MixtureOfExperts", "MixtureOfModels", "check_regression_data"]

GATES = ("softmax", "dirichlet", "per_sample")
MODES = ("soft", "hard")


def _as_tensor(value, name: str, like: Tensor | None = None) -> Tensor:
    if isinstance(value, Tensor):
        tensor = value
    else:
        try:
            array = np.asarray(value)
        except (TypeError, ValueError) as error:
            raise TypeError(f"{name} must be a numeric array or tensor: {error}") from None
        if not (np.issubdtype(array.dtype, np.number) or array.dtype == bool):
            raise TypeError(f"{name} must be numeric, got an array of dtype {array.dtype}")
        tensor = torch.as_tensor(array.astype(np.float64, copy=False))
        tensor = tensor.to(like.dtype if like is not None else torch.get_default_dtype())
    if not tensor.is_floating_point():
        if tensor.is_complex():
            raise TypeError(f"{name} must be real, got dtype {tensor.dtype}")
        tensor = tensor.to(like.dtype if like is not None else torch.get_default_dtype())
    if like is not None:
        tensor = tensor.to(device=like.device, dtype=like.dtype)
    return tensor


def check_regression_data(X, Y=None, input_dim: int | None = None) -> tuple[Tensor, Tensor | None]:
    """Return ``X`` (N, d) and ``Y`` (N,) as finite floating tensors, ``Y`` on ``X``'s
    device and dtype. ``Y`` may be (N,) or (N, 1); numpy arrays become tensors.

    Raises:
        TypeError: if ``X`` or ``Y`` is not numeric.
        ValueError: if ``X`` is not 2-D with ``input_dim`` columns and at least one row,
            ``Y`` is not (N,) or (N, 1) with the same N, or either holds NaN or inf.
    """
    X = _as_tensor(X, "X")
    if X.dim() != 2:
        raise ValueError(f"X must be 2-D (num_points, input_dim), got shape {tuple(X.shape)}")
    if input_dim is not None and X.shape[1] != input_dim:
        raise ValueError(f"X must have {input_dim} columns (input_dim), got {X.shape[1]}")
    if X.shape[0] < 1:
        raise ValueError("X must have at least one row")
    finite = torch.isfinite(X).all(-1)
    if not finite.all():
        raise ValueError(f"X contains NaN or inf (first at row {int((~finite).nonzero()[0])})")
    if Y is None:
        return X, None
    Y = _as_tensor(Y, "Y", like=X)
    if Y.dim() == 2 and Y.shape[1] == 1:
        Y = Y[:, 0]
    if Y.dim() != 1:
        raise ValueError(f"Y must have shape (N,) or (N, 1), got {tuple(Y.shape)}")
    if Y.shape[0] != X.shape[0]:
        raise ValueError(f"X and Y must have the same length, got {X.shape[0]} and {Y.shape[0]}")
    finite = torch.isfinite(Y)
    if not finite.all():
        raise ValueError(f"Y contains NaN or inf (first at row {int((~finite).nonzero()[0])})")
    return X, Y


class MixtureOfExperts(nn.Module):
    """A mixture of K regression experts with a gate, fitted by variational EM.

    ``p(y | x) = sum_k pi_k(x) N(y | x^T w_k, 1/beta_k)`` with ``w_k ~ N(w0_k, A_k)`` for
    the default Bayesian linear experts. Fit with
    [`fit_experts_em(model, X, Y)`][inference.fit_experts_em], then use ``predict``,
    ``predict_distribution`` and ``score``; [`model`][pyro_cwm.models.MixtureOfExperts.model]
    is the Pyro model.

    Args:
        num_experts: K >= 1.
        input_dim: d >= 1, the number of features of x.
        gate: ``"softmax"`` (a network of x: mixture of experts), ``"dirichlet"`` (constant
            weights: mixture of models), ``"per_sample"`` (a Dirichlet per point) or a
            [`Gate`][pyro_cwm.models.Gate].
        experts: an [`Experts`][pyro_cwm.models.Experts] module of K experts; default
            [`BayesianLinearExperts`][pyro_cwm.models.BayesianLinearExperts] built from
            ``prior_cov``, ``noise_precision`` and ``optimize``.
        regularizer: a [`PriorMeanRegularizer`][pyro_cwm.models.PriorMeanRegularizer] coupling the
            linear experts' prior means (its M-step then updates the prior means).
        hidden_dims: hidden widths of the softmax gate.
        concentration: the Dirichlet gates' ``mu`` (default 1, or 0.5 for ``"per_sample"``).
        prior_cov: ``prior_cov`` of the default experts.
        noise_precision: ``noise_precision`` of the default experts.
        optimize: ``optimize`` of the default experts.
        mode: ``"soft"`` (responsibility-weighted EM; its lower bound never decreases) or
            ``"hard"`` (stochastic EM: each point goes to one expert drawn from its
            responsibilities, the seed's ``"sample"`` mode; the best state is kept).
        max_iter: EM iterations per start.
        tol: stop when the lower bound per point changes by less than this (soft mode).
        n_init: random starts; the one with the best final bound is kept.
        seed: seed of the random starts (``None``: torch's global RNG).
        progress: show a progress bar (one summary line where the output is a log).

    Attributes after [`fit_experts_em`][inference.fit_experts_em]: ``history_`` (dict with
    lists ``"lower_bound"`` and ``"log_likelihood"``, per point and iteration, of the best
    start), ``n_iter_``, ``converged_``, ``lower_bound_``.

    Raises:
        TypeError, ValueError: for an argument of the wrong type or out of range.
    """

    def __init__(
        self,
        num_experts: int,
        input_dim: int,
        *,
        gate: str | Gate = "softmax",
        experts: Experts | None = None,
        regularizer: PriorMeanRegularizer | None = None,
        hidden_dims: Sequence[int] = (16,),
        concentration: float | Tensor | None = None,
        prior_cov: float | Tensor = 100.0,
        noise_precision: float | Tensor = 1.0,
        optimize: Iterable[str] = ("noise",),
        mode: str = "soft",
        max_iter: int = 200,
        tol: float = 1e-4,
        n_init: int = 3,
        seed: int | None = 0,
        progress: bool = False,
    ) -> None:
        super().__init__()
        K = self.num_experts = check_positive_int("num_experts", num_experts)
        d = self.input_dim = check_positive_int("input_dim", input_dim)
        if isinstance(gate, str):
            if gate == "softmax":
                gate = SoftmaxGate(K, d, hidden_dims)
            elif gate == "dirichlet":
                gate = DirichletGate(K, 1.0 if concentration is None else concentration)
            elif gate == "per_sample":
                gate = PerSampleDirichletGate(K, 0.5 if concentration is None else concentration)
            else:
                raise ValueError(f"gate must be one of {GATES} or a Gate, got {gate!r}")
        if not isinstance(gate, Gate):
            raise TypeError(f"gate must be one of {GATES} or a Gate, got {type(gate).__name__}")
        if gate.num_experts != K:
            raise ValueError(f"gate has {gate.num_experts} experts, num_experts is {K}")
        if experts is None:
            experts = BayesianLinearExperts(
                K, d, prior_cov=prior_cov, noise_precision=noise_precision, optimize=optimize
            )
        if not isinstance(experts, Experts):
            raise TypeError(f"experts must be an Experts module, got {type(experts).__name__}")
        if experts.num_experts != K or experts.input_dim != d:
            raise ValueError(
                f"experts has {experts.num_experts} experts of input_dim {experts.input_dim}, "
                f"expected {K} and {d}"
            )
        if regularizer is not None:
            if not isinstance(regularizer, PriorMeanRegularizer):
                raise TypeError(
                    f"regularizer must be a PriorMeanRegularizer, got {type(regularizer).__name__}"
                )
            if not isinstance(experts, BayesianLinearExperts):
                raise TypeError("a prior-mean regularizer needs BayesianLinearExperts")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not (isinstance(tol, (int, float)) and tol >= 0):
            raise ValueError(f"tol must be a number >= 0, got {tol}")
        self.gate, self.experts, self.regularizer = gate, experts, regularizer
        self.mode = mode
        self.max_iter = check_positive_int("max_iter", max_iter)
        self.tol = float(tol)
        self.n_init = check_positive_int("n_init", n_init)
        self.seed, self.progress = seed, bool(progress)
        self.history_: dict[str, list[float]] | None = None

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, input_dim={self.input_dim}, mode={self.mode!r}"

    def _reference(self) -> Tensor:
        for tensor in self.experts.buffers():
            return tensor
        return next(self.experts.parameters())

    def check_data(self, X, Y=None) -> tuple[Tensor, Tensor | None]:
        """Check ``X`` and ``Y`` against this model's ``input_dim``.

        As [`check_regression_data`][pyro_cwm.models.mixture_of_experts.check_regression_data].
        """
        return check_regression_data(X, Y, self.input_dim)

    # ------------------------------------------------------------------ EM pieces

    def initialize(self, X: Tensor, Y: Tensor) -> None:
        """A random start of experts and gate (torch's global RNG)."""
        self.experts.initialize(X, Y)
        self.gate.initialize(X)

    def log_joint(self, X: Tensor, Y: Tensor) -> Tensor:
        """``E_q[log pi_nk] + E_q[log p(y_n | x_n, k)]``: (N, K), training points."""
        return self.gate.expected_log_weights(X) + self.experts.expected_log_likelihood(X, Y)

    def penalty(self) -> Tensor:
        """The regularizer's penalty of the prior means (0 without a regularizer)."""
        if self.regularizer is None:
            return self._reference().new_zeros(())
        return self.regularizer.penalty(self.experts.prior_mean)

    def update(self, X: Tensor, Y: Tensor, weights: Tensor) -> None:
        """One coordinate-ascent sweep given responsibilities (or one-hot assignments)
        ``weights`` (N, K): experts' posterior, gate, hyperparameters."""
        self.experts.update_posterior(X, Y, weights)
        self.gate.update(X, weights)
        if self.regularizer is not None:
            self.experts.update_hyperparameters(X, Y, weights, self.regularizer)
        else:
            self.experts.update_hyperparameters(X, Y, weights)

    def lower_bound_terms(self, X: Tensor, Y: Tensor) -> tuple[Tensor, Tensor]:
        """The EM lower bound (a scalar, total over the points) at the optimal
        responsibilities, and those responsibilities (N, K)."""
        joint = self.log_joint(X, Y)
        log_norm = torch.logsumexp(joint, dim=-1)
        data_term = point_sums().total(log_norm.sum())  # over every process's points
        bound = data_term + self.experts.bound() + self.gate.bound() + self.penalty()
        return bound, torch.exp(joint - log_norm.unsqueeze(-1))

    @torch.no_grad()
    def lower_bound(self, X, Y) -> float:
        """The EM lower bound per point on training data ``X``, ``Y``."""
        X, Y = self.check_data(X, Y)
        return float(self.lower_bound_terms(X, Y)[0]) / X.shape[0]

    @torch.no_grad()
    def responsibilities(self, X, Y) -> Tensor:
        """Posterior probabilities of the experts given x and y, ``q(z_n = k)``: (N, K).

        Uses the predictive mixture (the gate's predicted weights), so any points work.
        """
        X, Y = self.check_data(X, Y)
        mean, scale = self.experts.predictive(X)
        joint = torch.log(self.gate(X)) + dist.Normal(mean, scale).log_prob(Y.unsqueeze(-1))
        return torch.softmax(joint, dim=-1)

    # ------------------------------------------------------------------ prediction

    @torch.no_grad()
    def predict_distribution(self, X) -> dist.MixtureSameFamily:
        """The predictive mixture ``sum_k pi_k(x) N(y | x^T m_k, 1/beta_k + x^T B_k x)``:
        batch shape (N,), event shape ()."""
        X, _ = self.check_data(X)
        X = X.to(self._reference())
        mean, scale = self.experts.predictive(X)
        weights = self.gate(X)
        return dist.MixtureSameFamily(dist.Categorical(probs=weights), dist.Normal(mean, scale))

    @torch.no_grad()
    def predict(self, X) -> tuple[Tensor, Tensor]:
        """Predictions ``sum_k pi_k(x) E[y | x, k]`` (N,) and gate weights ``pi(x)`` (N, K)."""
        X, _ = self.check_data(X)
        X = X.to(self._reference())
        weights = self.gate(X)
        return (weights * self.experts(X)).sum(-1), weights

    @torch.no_grad()
    def predict_proba(self, X) -> Tensor:
        """Gate weights ``pi(x)``: (N, K)."""
        return self.predict(X)[1]

    @torch.no_grad()
    def score_samples(self, X, Y) -> Tensor:
        """Predictive log-density ``log p(y_n | x_n)``: (N,)."""
        X, Y = self.check_data(X, Y)
        return self.predict_distribution(X).log_prob(Y.to(self._reference()))

    def score(self, X, Y) -> float:
        """Mean predictive log-density of the points."""
        return float(self.score_samples(X, Y).mean())

    # ------------------------------------------------------------------ Pyro model

    def model(self, X: Tensor, Y: Tensor | None = None) -> Tensor:
        """The mixture as a Pyro model (``max_plate_nesting=1``).

        Sites: ``"weights"`` (K, d) in plate ``"experts"`` (linear experts), ``"gate_weights"``
        (K,) or (N, K) for Dirichlet gates, ``"assignment"`` (N,) enumerated in parallel,
        ``"obs"`` (N,). The experts' hyperparameters (prior, noise) are fixed at their
        current values; a softmax gate's network is a ``pyro.module`` parameter. Returns
        the observations (``Y``, or draws when ``Y`` is None).
        """
        X, Y = self.check_data(X, Y)
        N = X.shape[0]
        means = self.experts.pyro_means(X)
        scales = self.experts.pyro_scales().to(X)
        data = pyro.plate("data", N, dim=-1)
        probs = self.gate.pyro_weights(X, data)
        with data:
            z = pyro.sample("assignment", dist.Categorical(probs), infer={"enumerate": "parallel"})
            loc = Vindex(means.T)[z, torch.arange(N, device=X.device)]
            return pyro.sample("obs", dist.Normal(loc, scales[z]), obs=Y)


class MixtureOfModels(MixtureOfExperts):
    """A mixture of models: a mixture of experts with constant weights ``pi ~ Dir(mu)``.

    That is, a [`MixtureOfExperts`][pyro_cwm.models.MixtureOfExperts] with a Dirichlet gate.

    Args:
        num_models: K >= 1.
        input_dim: d >= 1.
        concentration: ``mu`` > 0 of the Dirichlet prior.
        **options (Any): the other keyword arguments of
            [`MixtureOfExperts`][pyro_cwm.models.MixtureOfExperts] (not ``gate``).
    """

    def __init__(
        self, num_models: int, input_dim: int, *, concentration: float | Tensor = 1.0, **options
    ) -> None:
        if "gate" in options:
            raise TypeError("MixtureOfModels has a Dirichlet gate; use MixtureOfExperts for others")
        K = check_positive_int("num_models", num_models)
        super().__init__(K, input_dim, gate=DirichletGate(K, concentration), **options)
