"""The EM loop of mixtures of experts / models: bound, recovery, responsibilities, modes."""

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from inference import fit_experts_em
from pyro_cwm.data import two_planes
from pyro_cwm.models import (
    BayesianLinearExperts,
    MixtureOfExperts,
    MixtureOfModels,
    ModuleExperts,
    PriorMeanLink,
    PullPriorMeans,
)


def fitted(model, X, Y):
    """``model`` fitted by [`fit_experts_em`][inference.fit_experts_em] (the run is dropped)."""
    fit_experts_em(model, X, Y)
    return model


def plane_error(weights: torch.Tensor, truth: torch.Tensor) -> float:
    """Largest coefficient error after the best label permutation."""
    weights = weights.detach().cpu().to(truth.dtype)
    return min(
        float((weights[list(p)] - truth).abs().max())
        for p in itertools.permutations(range(len(truth)))
    )


class AllDataExperts(BayesianLinearExperts):
    """The seed's defect: every expert gets all points with weight one."""

    def update_posterior(self, X, Y, weights):
        super().update_posterior(X, Y, torch.ones_like(weights))

    def update_hyperparameters(self, X, Y, weights, regularizer=None):
        super().update_hyperparameters(X, Y, torch.ones_like(weights), regularizer)


@pytest.mark.parametrize("seed", [0, 3, 42])
@pytest.mark.parametrize("cls", [MixtureOfModels, MixtureOfExperts])
def test_two_planes_are_recovered(cls, seed):
    X, Y, truth = two_planes(200, seed=seed)
    model = fitted(cls(2, 2, seed=seed, n_init=2, max_iter=60), X, Y)
    assert plane_error(model.experts.post_mean, truth) < 2.0


def test_ignoring_responsibilities_collapses_the_planes():
    X, Y, truth = two_planes(200, seed=42)
    broken = MixtureOfModels(2, 2, experts=AllDataExperts(2, 2), seed=0, n_init=2, max_iter=30)
    fit_experts_em(broken, X, Y)
    w = broken.experts.post_mean
    assert (w[0] - w[1]).abs().max() < 1e-3  # both experts on the same plane
    assert plane_error(w, truth) > 5.0
    ours = fitted(MixtureOfModels(2, 2, seed=0, n_init=2, max_iter=30), X, Y)
    assert plane_error(ours.experts.post_mean, truth) < 2.0


@pytest.mark.parametrize(
    "options",
    [
        {"gate": "dirichlet"},
        {"gate": "softmax"},
        {"gate": "per_sample"},
        {"gate": "dirichlet", "optimize": ("noise", "prior_mean", "prior_cov")},
        {"gate": "dirichlet", "regularizer": PullPriorMeans(0.5), "optimize": ("noise",)},
        {
            "gate": "softmax",
            "regularizer": PriorMeanLink(lambda w: -0.1 * w.square().sum(), steps=20),
            "optimize": ("noise", "prior_cov"),
        },
    ],
    ids=["dirichlet", "softmax", "per_sample", "all_hyper", "pull", "link"],
)
def test_soft_em_lower_bound_never_decreases(options):
    X, Y, _ = two_planes(120, seed=5, dtype=torch.float64)
    model = fitted(MixtureOfExperts(2, 2, n_init=1, max_iter=40, tol=0.0, seed=1, **options), X, Y)
    bounds = np.array(model.history_["lower_bound"])
    assert len(bounds) == 40 and np.isfinite(bounds).all()
    assert (np.diff(bounds) >= -1e-9 * np.abs(bounds[1:])).all()
    assert len(model.history_["log_likelihood"]) == 40
    # The sweep after the last recorded bound does not decrease it either.
    assert model.lower_bound(X, Y) >= bounds[-1] - 1e-9 * abs(bounds[-1])


def test_hard_mode_recovers_the_planes_and_keeps_its_best_state():
    X, Y, truth = two_planes(200, seed=42)
    model = fitted(MixtureOfModels(2, 2, mode="hard", seed=0, n_init=1, max_iter=40), X, Y)
    assert plane_error(model.experts.post_mean, truth) < 2.0
    assert model.lower_bound_ == pytest.approx(max(model.history_["lower_bound"]))


def test_fit_is_deterministic_leaves_the_rng_alone_and_follows_float64():
    X, Y, _ = two_planes(80, seed=2, dtype=torch.float64)
    first = MixtureOfExperts(2, 2, seed=7, n_init=2, max_iter=10)
    state = torch.random.get_rng_state()
    fit_experts_em(first, X, Y)
    assert torch.equal(torch.random.get_rng_state(), state)
    second = fitted(MixtureOfExperts(2, 2, seed=7, n_init=2, max_iter=10), X, Y)
    assert first.experts.post_mean.dtype == torch.float64
    assert next(first.gate.parameters()).dtype == torch.float64
    torch.testing.assert_close(first.experts.post_mean, second.experts.post_mean)
    prediction, weights = first.predict(X)
    assert prediction.shape == (80,) and weights.shape == (80, 2)
    assert prediction.dtype == torch.float64


def test_state_dict_round_trip_keeps_predictions(tmp_path):
    X, Y, _ = two_planes(60, seed=3)
    model = fitted(MixtureOfExperts(2, 2, gate="per_sample", n_init=1, max_iter=10), X, Y)
    torch.save(model.state_dict(), tmp_path / "moe.pt")
    loaded = MixtureOfExperts(2, 2, gate="per_sample")
    loaded.load_state_dict(torch.load(tmp_path / "moe.pt", weights_only=True))
    torch.testing.assert_close(loaded.predict(X)[0], model.predict(X)[0])
    torch.testing.assert_close(loaded.score(X, Y), model.score(X, Y))


def test_module_experts_admit_any_torch_regression_module():
    X, Y, truth = two_planes(200, seed=42)
    modules = [nn.Linear(2, 1, bias=False), nn.Linear(2, 1, bias=False)]
    experts = ModuleExperts(modules, 2, steps=30, lr=0.5)
    model = fitted(MixtureOfModels(2, 2, experts=experts, seed=0, n_init=3, max_iter=40), X, Y)
    weights = torch.cat([m.weight for m in modules])
    assert plane_error(weights, truth) < 2.0
    bounds = np.array(model.history_["lower_bound"])
    assert (np.diff(bounds) >= -1e-5 * np.abs(bounds[1:])).all()


def test_fit_experts_em_returns_the_run():
    X, Y, _ = two_planes(50, seed=4)
    model = MixtureOfModels(2, 2, n_init=2, max_iter=50)
    run = fit_experts_em(model, X, Y)
    assert run.n_iter == model.n_iter_ == len(run.lower_bounds)
    assert run.best_init in (0, 1) and model.converged_ == run.converged


@pytest.mark.cuda
def test_fit_on_cuda():
    X, Y, truth = two_planes(200, seed=42)
    model = fitted(MixtureOfExperts(2, 2, n_init=2, max_iter=60), X.cuda(), Y.cuda())
    assert model.experts.post_mean.is_cuda
    assert plane_error(model.experts.post_mean, truth) < 2.0
    assert model.predict(X.cuda())[0].is_cuda
