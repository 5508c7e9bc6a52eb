"""Mixtures of experts: K local regression models (the experts) weighted by a gate.

```text
p(y | x) = sum_k pi_k(x) p(y | x, expert k)
```

The three parts, one module each:

- `pyro_cwm.models.mixture_of_experts.experts`: the experts ``p(y | x, expert k)``,
  [`Experts`][pyro_cwm.models.Experts] (Bayesian linear regressions by default), and the
  regularizers of their prior means.
- `pyro_cwm.models.mixture_of_experts.gates`: the gates, the weights ``pi_k(x)``
  ([`Gate`][pyro_cwm.models.Gate]): a softmax network of x (a mixture of experts), constant
  Dirichlet weights (a mixture of models) or a per-point Dirichlet.
- `pyro_cwm.models.mixture_of_experts.mixture`: the model that combines K experts and a gate,
  [`MixtureOfExperts`][pyro_cwm.models.MixtureOfExperts] and
  [`MixtureOfModels`][pyro_cwm.models.MixtureOfModels], with the checks of regression data.

The variational EM lower bound, with ``q(z_n) = r_n``:

```text
L = sum_nk r_nk (E_q[log pi_nk] + E_q[log p(y_n | x_n, w_k)]) - sum_nk r_nk log r_nk
    - sum_k KL(q(w_k) || p(w_k)) + gate term + regularizer penalty
```

is maximized by [`fit_experts_em`][inference.fit_experts_em] (``fit_experts_em(model, X, Y)``:
the fitting lives in ``inference``, which imports ``pyro_cwm``, never the reverse);
[`MixtureOfExperts.model`][pyro_cwm.models.MixtureOfExperts.model] writes the same model for
Pyro, with the assignment enumerated so that ``TraceEnum_ELBO`` and ``NUTS`` sum it out.
"""

from pyro_cwm.models.mixture_of_experts.experts import (
    BayesianLinearExperts,
    Experts,
    ModuleExperts,
    PriorMeanLink,
    PriorMeanRegularizer,
    PullPriorMeans,
)
from pyro_cwm.models.mixture_of_experts.gates import (
    DirichletGate,
    Gate,
    PerSampleDirichletGate,
    SoftmaxGate,
)
from pyro_cwm.models.mixture_of_experts.mixture import (
    MixtureOfExperts,
    MixtureOfModels,
    check_regression_data,
)

__all__ = [
    "BayesianLinearExperts",
    "DirichletGate",
    "Experts",
    "Gate",
    "MixtureOfExperts",
    "MixtureOfModels",
    "ModuleExperts",
    "PerSampleDirichletGate",
    "PriorMeanLink",
    "PriorMeanRegularizer",
    "PullPriorMeans",
    "SoftmaxGate",
    "check_regression_data",
]
