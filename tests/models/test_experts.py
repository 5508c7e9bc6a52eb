"""Experts, gates and regularizers of the mixture of experts, against closed forms."""

import math

import numpy as np
import pyro
import pytest
import scipy.special
import scipy.stats
import torch
from pyro.infer import SVI, TraceEnum_ELBO
from pyro.infer.autoguide import AutoDelta, init_to_value

from inference import fit_experts_em
from pyro_cwm.data import two_planes
from pyro_cwm.models import (
    BayesianLinearExperts,
    DirichletGate,
    MixtureOfExperts,
    MixtureOfModels,
    PerSampleDirichletGate,
    PriorMeanLink,
    PullPriorMeans,
    SoftmaxGate,
)

D64 = torch.float64



def fitted(model, X, Y):
    """``model`` fitted by [`fit_experts_em`][inference.fit_experts_em] (the run is dropped)."""
    fit_experts_em(model, X, Y)
    return model


def _regression(n=30, d=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    y = X @ rng.normal(size=d) + 0.3 * rng.normal(size=n)
    return X, y


def _spd(d, seed):
    m = np.random.default_rng(seed).normal(size=(d, d))
    return m @ m.T + d * np.eye(d)


def _conditioning_posterior(X, y, w0, A, noise_var):
    """Posterior of w ~ N(w0, A) given y = X w + e, e ~ N(0, diag(noise_var)), by Gaussian
    conditioning of the joint (w, y) (the Woodbury form, independent of the code's)."""
    S = X @ A @ X.T + np.diag(noise_var)
    gain = np.linalg.solve(S, X @ A).T  # A X^T S^{-1}
    return w0 + gain @ (y - X @ w0), A - gain @ X @ A


def _experts(K, d, w0, A, beta):
    return BayesianLinearExperts(
        K, d, prior_mean=torch.tensor(w0), prior_cov=torch.tensor(A),
        noise_precision=torch.tensor(beta),
    ).to(D64)


def test_e_step_is_the_bayesian_regression_posterior():
    X, y = _regression()
    d = X.shape[1]
    w0, A, beta = np.array([0.5, -1.0, 2.0]), _spd(d, 1), 4.0
    experts = _experts(1, d, w0, A, beta)
    Xt, yt = torch.tensor(X), torch.tensor(y)
    experts.update_posterior(Xt, yt, torch.ones(len(y), 1, dtype=D64))
    mean, cov = _conditioning_posterior(X, y, w0, A, np.full(len(y), 1 / beta))
    np.testing.assert_allclose(experts.post_mean[0].numpy(), mean, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(experts.post_cov[0].numpy(), cov, rtol=1e-9, atol=1e-12)


def test_e_step_weights_points_by_their_responsibilities():
    # Responsibility r_n scales point n's noise precision: beta r_n. An E-step that gives
    # every expert all points with weight one (the seed's defect) fails this test.
    X, y = _regression(n=40, seed=2)
    d = X.shape[1]
    r = np.random.default_rng(3).uniform(0.05, 1.0, size=(len(y), 2))
    w0, A, beta = np.zeros(d), 10.0 * np.eye(d), 2.0
    experts = _experts(2, d, w0, A, beta)
    experts.update_posterior(torch.tensor(X), torch.tensor(y), torch.tensor(r))
    for k in range(2):
        mean, cov = _conditioning_posterior(X, y, w0, A, 1 / (beta * r[:, k]))
        np.testing.assert_allclose(experts.post_mean[k].numpy(), mean, rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(experts.post_cov[k].numpy(), cov, rtol=1e-8, atol=1e-12)


def test_expected_log_likelihood_and_kl_against_references():
    X, y = _regression(n=5, d=2, seed=4)
    experts = _experts(1, 2, np.array([1.0, 0.0]), _spd(2, 5), 3.0)
    experts.update_posterior(torch.tensor(X), torch.tensor(y), torch.ones(5, 1, dtype=D64))
    m, B = experts.post_mean[0].numpy(), experts.post_cov[0].numpy()
    draws = np.random.default_rng(6).multivariate_normal(m, B, size=400_000)
    mc = scipy.stats.norm.logpdf(y[:, None], X @ draws.T, 1 / math.sqrt(3.0)).mean(1)
    ell = experts.expected_log_likelihood(torch.tensor(X), torch.tensor(y))[:, 0].numpy()
    np.testing.assert_allclose(ell, mc, atol=5e-3)
    reference = torch.distributions.kl_divergence(
        torch.distributions.MultivariateNormal(experts.post_mean[0], experts.post_cov[0]),
        torch.distributions.MultivariateNormal(experts.prior_mean[0], experts.prior_cov[0]),
    )
    torch.testing.assert_close(experts.kl_divergence()[0], reference)


def test_noise_m_step_is_the_weighted_expected_residual():
    X, y = _regression(n=20, d=2, seed=7)
    r = np.random.default_rng(8).uniform(0.1, 1.0, size=(20, 1))
    experts = _experts(1, 2, np.zeros(2), np.eye(2), 1.0)
    Xt, yt, rt = torch.tensor(X), torch.tensor(y), torch.tensor(r)
    experts.update_posterior(Xt, yt, rt)
    experts.update_hyperparameters(Xt, yt, rt)
    m, B = experts.post_mean[0].numpy(), experts.post_cov[0].numpy()
    expected = (r[:, 0] * ((y - X @ m) ** 2 + np.einsum("ni,ij,nj->n", X, B, X))).sum()
    assert experts.noise_precision[0].item() == pytest.approx(r.sum() / expected, rel=1e-10)


def test_gate_probabilities_normalize():
    X = torch.randn(7, 3)
    r = torch.softmax(torch.randn(7, 4), -1)
    for gate in (DirichletGate(4, 0.7), SoftmaxGate(4, 3, (5,)), PerSampleDirichletGate(4, 0.3)):
        gate.initialize(X)
        gate.update(X, r)
        probs = gate(torch.randn(11, 3))
        assert probs.shape == (11, 4) and (probs >= 0).all()
        torch.testing.assert_close(probs.sum(-1), torch.ones(11))
        expected_log = gate.expected_log_weights(X)
        assert expected_log.shape == (7, 4)
        # E[log pi] <= log E[pi] (Jensen): the exponentials sum to at most one.
        assert (expected_log.exp().sum(-1) <= 1 + 1e-6).all()


def test_dirichlet_gate_posterior_and_expected_log_weights():
    gate = DirichletGate(3, torch.tensor([0.5, 1.0, 2.0]))
    r = torch.softmax(torch.randn(10, 3), -1)
    gate.update(torch.zeros(10, 1), r)
    a = np.array([0.5, 1.0, 2.0]) + r.sum(0).numpy()
    np.testing.assert_allclose(gate.concentration.numpy(), a, rtol=1e-6)
    reference = scipy.special.digamma(a) - scipy.special.digamma(a.sum())
    np.testing.assert_allclose(gate.expected_log_weights(torch.zeros(2, 1))[0], reference, 1e-5)


def test_per_sample_gate_knows_only_its_training_points():
    gate = PerSampleDirichletGate(2)
    gate.initialize(torch.zeros(5, 1))
    with pytest.raises(ValueError, match="training points"):
        gate.expected_log_weights(torch.zeros(4, 1))


def test_per_sample_gate_loads_a_state_saved_without_its_mean_weights():
    # Older state dicts hold the concentrations only: the predicted weights are their
    # average posterior mean, computed by hand here.
    concentration = torch.tensor([[1.0, 3.0], [2.0, 2.0], [5.0, 1.0]])
    gate = PerSampleDirichletGate(2)
    gate.load_state_dict(
        {"prior_concentration": torch.full((2,), 0.5), "concentration": concentration}
    )
    expected = torch.tensor([(0.25 + 0.5 + 5 / 6) / 3, (0.75 + 0.5 + 1 / 6) / 3])
    torch.testing.assert_close(gate(torch.zeros(4, 1))[0], expected)


def test_pull_prior_means_solves_its_stationarity_conditions():
    experts = _experts(3, 2, np.zeros(2), _spd(2, 9), 1.0)
    experts.post_mean.copy_(torch.tensor([[1.0, 2.0], [-1.0, 0.5], [3.0, -2.0]], dtype=D64))
    reg = PullPriorMeans(strength=0.7)
    reg.update_prior_means(experts)
    w0 = experts.prior_mean.clone().requires_grad_(True)
    precision = torch.linalg.inv(experts.prior_cov)
    diff = experts.post_mean - w0
    objective = -0.5 * torch.einsum("ki,kij,kj->", diff, precision, diff) + reg.penalty(w0)
    (grad,) = torch.autograd.grad(objective, w0)
    assert grad.abs().max() < 1e-10
    # Limits: no pull keeps w0 = m, a strong pull gives one common prior mean.
    PullPriorMeans(0.0).update_prior_means(experts)
    torch.testing.assert_close(experts.prior_mean, experts.post_mean)
    PullPriorMeans(1e8).update_prior_means(experts)
    assert (experts.prior_mean - experts.prior_mean[0]).abs().max() < 1e-5


def test_prior_mean_link_maximizes_the_link():
    # R(w0) = -c |w0|^2 has the closed-form maximizer w0_k = (A^-1 + 2c I)^-1 A^-1 m_k.
    experts = _experts(2, 2, np.zeros(2), 2.0 * np.eye(2), 1.0)
    experts.post_mean.copy_(torch.tensor([[1.0, 2.0], [-3.0, 0.5]], dtype=D64))
    c = 0.4
    PriorMeanLink(lambda w: -c * w.square().sum(), steps=500, lr=0.05).update_prior_means(experts)
    expected = experts.post_mean * (0.5 / (0.5 + 2 * c))
    torch.testing.assert_close(experts.prior_mean, expected, atol=1e-3, rtol=0)


def test_bad_input_gives_clear_errors():
    X, Y, _ = two_planes(20, seed=0)
    model = MixtureOfExperts(2, 2, n_init=1, max_iter=2)
    with pytest.raises(ValueError, match="same length"):
        fit_experts_em(model, X, Y[:-1])
    bad = X.clone()
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="X contains NaN"):
        fit_experts_em(model, bad, Y)
    bad = Y.clone()
    bad[5] = float("inf")
    with pytest.raises(ValueError, match="Y contains NaN or inf"):
        fit_experts_em(model, X, bad)
    with pytest.raises(ValueError, match="X must be 2-D"):
        fit_experts_em(model, X[:, 0], Y)
    with pytest.raises(ValueError, match="3 columns"):
        fit_experts_em(MixtureOfExperts(2, 3), X, Y)
    with pytest.raises(ValueError, match="Y must have shape"):
        fit_experts_em(model, X, torch.stack([Y, Y], -1))
    with pytest.raises(ValueError, match="num_experts must be >= 1"):
        MixtureOfExperts(0, 2)
    with pytest.raises(ValueError, match="num_models must be >= 1"):
        MixtureOfModels(0, 2)
    with pytest.raises(TypeError, match="num_experts must be an int"):
        MixtureOfExperts(2.0, 2)
    with pytest.raises(ValueError, match="must not exceed the number of points"):
        fit_experts_em(MixtureOfExperts(3, 2), X[:2], Y[:2])
    with pytest.raises(ValueError, match="gate must be one of"):
        MixtureOfExperts(2, 2, gate="uniform")
    with pytest.raises(ValueError, match="mode must be one of"):
        MixtureOfExperts(2, 2, mode="sample")
    with pytest.raises(ValueError, match="prior_cov must be positive definite"):
        MixtureOfExperts(2, 2, prior_cov=-1.0)
    with pytest.raises(ValueError, match="optimize must be a subset"):
        MixtureOfExperts(2, 2, optimize=("beta",))
    with pytest.raises(TypeError, match="X must be numeric"):
        fit_experts_em(model, np.array([["a", "b"]]), [1.0])


def test_predictive_distribution_is_a_normalized_mixture():
    X, Y, _ = two_planes(60, seed=1)
    model = fitted(MixtureOfExperts(2, 2, n_init=1, max_iter=5), X, Y)
    predictive = model.predict_distribution(X[:4])
    assert predictive.batch_shape == (4,) and predictive.event_shape == ()
    grid = torch.linspace(-200, 200, 40_001)
    density = predictive.log_prob(grid[:, None]).exp()
    mass = torch.trapezoid(density, grid, dim=0)
    torch.testing.assert_close(mass, torch.ones(4), atol=1e-4, rtol=0)
    prediction, weights = model.predict(X[:4])
    torch.testing.assert_close(prediction, predictive.mean)
    torch.testing.assert_close(weights.sum(-1), torch.ones(4))


def test_pyro_model_fitted_by_svi_finds_the_planes():
    X, Y, truth = two_planes(200, seed=42)
    model = MixtureOfModels(2, 2, noise_precision=1 / 25.0, optimize=())
    exposed = pyro.poutine.block(model.model, expose=["weights", "gate_weights"])
    start = {"weights": torch.tensor([[1.0, 1.0], [-1.0, 5.0]]), "gate_weights": torch.ones(2) / 2}
    guide = AutoDelta(exposed, init_loc_fn=init_to_value(values=start))
    svi = SVI(model.model, guide, pyro.optim.Adam({"lr": 0.2}), TraceEnum_ELBO(max_plate_nesting=1))
    for _ in range(300):
        svi.step(X, Y)
    weights = guide.median()["weights"].detach()
    if weights[0, 0] < weights[1, 0]:
        weights = weights.flip(0)
    assert (weights - truth).abs().max() < 2.0
