"""The gates of a mixture of experts: the weights ``pi_k(x)`` that mix the K experts.

The experts themselves are in ``mixture_of_experts.experts``, the model that combines them
with a gate in ``mixture_of_experts.mixture``. A gate answers what a variational EM loop asks
of it (see [`Gate`][pyro_cwm.models.Gate]): the expected log weights ``E_q[log pi_nk]`` of
the training points, its update from the responsibilities ``r`` (N, K), its term of the
lower bound, and the weights it predicts for new points.

- [`DirichletGate`][pyro_cwm.models.DirichletGate]: constant weights ``pi ~ Dir(mu)`` with
  posterior ``Dir(mu + sum_n r_n)`` -- a mixture of models (the seed's
  ``HyperModelDirichlet``).
- [`SoftmaxGate`][pyro_cwm.models.SoftmaxGate]: ``pi(x) = softmax(f(x))`` with an MLP ``f``
  -- a mixture of experts (the seed's ``HyperExpertNN``), fitted by maximizing
  ``sum_nk r_nk log pi_k(x_n)``.
- [`PerSampleDirichletGate`][pyro_cwm.models.PerSampleDirichletGate]: one ``pi_n ~ Dir(mu)``
  per point, posterior ``Dir(mu + r_n)`` -- with ``mu < 1`` a sparse gate (the seed's
  ``HyperModelGateSparsed``).
"""

from __future__ import annotations

import abc
import copy
import math
from collections.abc import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn
from torch.distributions import kl_divergence

from pyro_cwm.models.point_sums import point_sums
from pyro_cwm.nn.checks import check_hidden_dims, check_positive_int
from pyro_cwm.nn.classifiers import mlp

__all__ = ["Gate", "DirichletGate", "SoftmaxGate", "PerSampleDirichletGate"]


def _concentration(value, K: int) -> Tensor:
    value = torch.as_tensor(value, dtype=torch.get_default_dtype())
    if value.dim() > 1 or (value.dim() == 1 and value.shape[0] != K):
        raise ValueError(
            f"concentration must be a float or have shape ({K},), got {tuple(value.shape)}"
        )
    if not (torch.isfinite(value).all() and (value > 0).all()):
        raise ValueError("concentration must be finite and > 0")
    return value.expand(K).clone()


class Gate(nn.Module, abc.ABC):
    """Base class of the gates: K weights per point, rows on the simplex.

    Shapes: ``X`` (N, d); responsibilities or hard assignments ``weights`` (N, K).
    """

    num_experts: int

    @abc.abstractmethod
    def initialize(self, X: Tensor) -> None:
        """Reset to a (random, from torch's global RNG) start before an EM run on ``X``."""

    @abc.abstractmethod
    def expected_log_weights(self, X: Tensor) -> Tensor:
        """``E_q[log pi_k(x_n)]`` for the training points: (N, K)."""

    @abc.abstractmethod
    def update(self, X: Tensor, weights: Tensor) -> None:
        """Update from the responsibilities (the gate's E- and M-step)."""

    @abc.abstractmethod
    def bound(self) -> Tensor:
        """The gate's own term of the lower bound (``-KL(q(pi) || p(pi))``): a scalar."""

    @abc.abstractmethod
    def forward(self, X: Tensor) -> Tensor:
        """Predicted weights ``E[pi(x)]`` for (new) points: (N, K), rows summing to one."""

    @abc.abstractmethod
    def pyro_weights(self, X: Tensor, data_plate: pyro.plate) -> Tensor:
        """Inside a Pyro model: sample or register the gate; weights (K,) or (N, K)."""


class DirichletGate(Gate):
    """Constant weights with a Dirichlet prior ``Dir(mu)`` and posterior ``Dir(a)``.

    ``a = mu + sum_n r_n``; ``E[log pi_k] = digamma(a_k) - digamma(sum a)``; predicted
    weights ``a / sum a``. In the Pyro model: site ``"gate_weights"`` ``pi ~ Dir(mu)`` (K,).

    Args:
        num_experts: K >= 1.
        concentration: ``mu`` > 0, a float or (K,).

    Raises:
        TypeError, ValueError: for an argument of the wrong type, shape or range.
    """

    def __init__(self, num_experts: int, concentration: float | Tensor = 1.0) -> None:
        super().__init__()
        self.num_experts = check_positive_int("num_experts", num_experts)
        mu = _concentration(concentration, self.num_experts)
        self.register_buffer("prior_concentration", mu)
        self.register_buffer("concentration", mu.clone())

    def initialize(self, X: Tensor) -> None:
        self.concentration.copy_(self.prior_concentration)

    def expected_log_weights(self, X: Tensor) -> Tensor:
        a = self.concentration
        return (torch.digamma(a) - torch.digamma(a.sum())).expand(X.shape[0], -1)

    def update(self, X: Tensor, weights: Tensor) -> None:
        self.concentration.copy_(self.prior_concentration + point_sums().total(weights.sum(0)))

    def bound(self) -> Tensor:
        return -kl_divergence(
            dist.Dirichlet(self.concentration), dist.Dirichlet(self.prior_concentration)
        )

    def forward(self, X: Tensor) -> Tensor:
        a = self.concentration
        return (a / a.sum()).to(X).expand(X.shape[0], -1)

    def pyro_weights(self, X: Tensor, data_plate: pyro.plate) -> Tensor:
        return pyro.sample("gate_weights", dist.Dirichlet(self.prior_concentration.to(X)))


class SoftmaxGate(Gate):
    """A softmax network of x: ``pi(x) = softmax(f(x))``, point-estimated.

    The update takes ``steps`` Adam steps on ``sum_nk r_nk log pi_k(x_n)`` (plus an L2
    penalty ``weight_decay |theta|^2 / 2``, part of the bound) and keeps them only if that
    objective improved, so soft EM never decreases its bound. In the Pyro model the network
    is registered with ``pyro.module("gate", ...)``.

    Args:
        num_experts: K >= 1.
        input_dim: d >= 1.
        hidden_dims: hidden widths of ``f``; ``()`` is multinomial logistic regression.
        steps: Adam steps per update.
        lr: Adam learning rate.
        weight_decay: L2 penalty >= 0 on the network's parameters.

    Raises:
        TypeError, ValueError: for an argument of the wrong type or range.
    """

    def __init__(
        self,
        num_experts: int,
        input_dim: int,
        hidden_dims: Sequence[int] = (16,),
        *,
        steps: int = 20,
        lr: float = 0.02,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        self.num_experts = check_positive_int("num_experts", num_experts)
        self.input_dim = check_positive_int("input_dim", input_dim)
        self.steps = check_positive_int("steps", steps)
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {lr}")
        if not (math.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay}")
        self.lr, self.weight_decay = float(lr), float(weight_decay)
        self.net = mlp(self.input_dim, self.num_experts, check_hidden_dims(hidden_dims), nn.Tanh)

    def initialize(self, X: Tensor) -> None:
        for module in self.net.modules():
            if isinstance(module, nn.Linear):
                module.reset_parameters()

    def expected_log_weights(self, X: Tensor) -> Tensor:
        return torch.log_softmax(self.net(X), dim=-1)

    def _penalty(self) -> Tensor:
        return 0.5 * self.weight_decay * sum(p.square().sum() for p in self.net.parameters())

    def _data_term(self, X: Tensor, weights: Tensor) -> Tensor:
        return (weights * torch.log_softmax(self.net(X), -1)).sum()

    def _objective(self, X: Tensor, weights: Tensor) -> Tensor:
        """``sum_nk r_nk log pi_k(x_n) - penalty`` over the points of every process."""
        return point_sums().total(self._data_term(X, weights)) - self._penalty()

    def update(self, X: Tensor, weights: Tensor) -> None:
        sums = point_sums()
        N = sums.count(X.shape[0])
        with torch.no_grad():
            before = self._objective(X, weights)
        saved = copy.deepcopy(self.net.state_dict())
        optimizer = torch.optim.Adam(self.net.parameters(), lr=self.lr)
        with torch.enable_grad():
            for _ in range(self.steps):
                optimizer.zero_grad()
                (-self._data_term(X, weights) / N).backward()
                sums.total_gradients(self.net.parameters())
                (self._penalty() / N).backward()
                optimizer.step()
        with torch.no_grad():
            after = self._objective(X, weights)
        if not (after >= before):
            self.net.load_state_dict(saved)

    def bound(self) -> Tensor:
        with torch.no_grad():
            return -self._penalty()

    def forward(self, X: Tensor) -> Tensor:
        return torch.softmax(self.net(X), dim=-1)

    def pyro_weights(self, X: Tensor, data_plate: pyro.plate) -> Tensor:
        pyro.module("gate", self.net)
        return torch.softmax(self.net(X), dim=-1)


class PerSampleDirichletGate(Gate):
    """One weight vector per point, ``pi_n ~ Dir(mu)``, posterior ``Dir(mu + r_n)``.

    ``E[log pi_nk] = digamma(mu_k + r_nk) - digamma(sum mu + 1)``; with ``mu < 1`` the gate
    prefers sparse weights (the seed's sparse gate). The training points' posteriors live in
    the buffer ``concentration`` (N, K), so
    [`expected_log_weights`][pyro_cwm.models.Gate.expected_log_weights] accepts the training
    points only. For new points, whose ``pi`` has only the prior, the predicted weights are
    the average posterior mean over the training points (an empirical estimate of
    ``E[pi]``). In the Pyro model: site ``"gate_weights"`` (N, K) in the data plate.

    Args:
        num_experts: K >= 1.
        concentration: ``mu`` > 0, a float or (K,).

    Raises:
        TypeError, ValueError: for an argument of the wrong type, shape or range.
    """

    def __init__(self, num_experts: int, concentration: float | Tensor = 0.5) -> None:
        super().__init__()
        self.num_experts = check_positive_int("num_experts", num_experts)
        mu = _concentration(concentration, self.num_experts)
        self.register_buffer("prior_concentration", mu)
        self.register_buffer("concentration", mu.unsqueeze(0).clone())
        self.register_buffer("mean_weights", mu / mu.sum())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # The number of training points is only known after a fit: adopt the saved shape.
        key = prefix + "concentration"
        if key in state_dict and state_dict[key].shape != self.concentration.shape:
            self.concentration = torch.empty_like(state_dict[key])
        if key in state_dict and prefix + "mean_weights" not in state_dict:
            # saved before the averaged weights were kept: their average over these points
            a = state_dict[key]
            state_dict[prefix + "mean_weights"] = (a / a.sum(-1, keepdim=True)).mean(0)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def initialize(self, X: Tensor) -> None:
        self.concentration = (
            (self.prior_concentration + 1.0 / self.num_experts).expand(X.shape[0], -1).clone()
        )
        self._average()

    def _average(self) -> None:
        # The posterior mean averaged over every training point (of every process): the
        # weights predicted for new points.
        sums, a = point_sums(), self.concentration
        total = sums.total((a / a.sum(-1, keepdim=True)).sum(0))
        self.mean_weights = total / sums.count(a.shape[0])

    def expected_log_weights(self, X: Tensor) -> Tensor:
        a = self.concentration
        if a.shape[0] != X.shape[0]:
            raise ValueError(
                f"a per-sample gate knows its {a.shape[0]} training points only, got "
                f"{X.shape[0]} points"
            )
        return torch.digamma(a) - torch.digamma(a.sum(-1, keepdim=True))

    def update(self, X: Tensor, weights: Tensor) -> None:
        self.concentration = self.prior_concentration + weights
        self._average()

    def bound(self) -> Tensor:
        prior = dist.Dirichlet(self.prior_concentration.expand_as(self.concentration))
        return -point_sums().total(kl_divergence(dist.Dirichlet(self.concentration), prior).sum())

    def forward(self, X: Tensor) -> Tensor:
        return self.mean_weights.to(X).expand(X.shape[0], -1)

    def pyro_weights(self, X: Tensor, data_plate: pyro.plate) -> Tensor:
        with data_plate:
            return pyro.sample("gate_weights", dist.Dirichlet(self.prior_concentration.to(X)))
