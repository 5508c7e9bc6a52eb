"""EM for diagonal Gaussian mixtures and EM pretraining, against scikit-learn and scipy."""

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.mixture import GaussianMixture

from inference.em import diagonal_joint_log_probs, em_pretrain, fit_diagonal_gmm
from pyro_cwm import CWM


def three_clusters(n=900, seed=0):
    rng = np.random.default_rng(seed)
    means = np.array([[-4.0, 0.0], [0.0, 3.0], [4.0, -1.0]])
    sds = np.array([[0.5, 1.0], [1.0, 0.3], [0.7, 0.7]])
    labels = rng.integers(0, 3, n)
    return means[labels] + sds[labels] * rng.standard_normal((n, 2)), means, sds


def test_joint_log_probs_match_scipy():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((20, 3)) * 3
    w = np.array([0.2, 0.5, 0.3])
    mu = rng.standard_normal((3, 3))
    var = rng.uniform(0.3, 2.0, (3, 3))
    ours = diagonal_joint_log_probs(*(torch.tensor(a) for a in (x, w, mu, var))).numpy()
    ref = np.stack(
        [
            np.log(w[k]) + stats.multivariate_normal(mu[k], np.diag(var[k])).logpdf(x)
            for k in range(3)
        ],
        -1,
    )
    assert np.allclose(ours, ref, atol=1e-10)


def test_log_likelihood_never_decreases_without_regularization():
    x, _, _ = three_clusters()
    fit = fit_diagonal_gmm(torch.tensor(x), 5, max_iter=60, tol=0.0, reg_covar=0.0, seed=3)
    steps = np.diff(fit.log_likelihood)
    assert len(steps) == 60
    assert (steps >= -1e-10).all()


def test_recovers_known_parameters_and_matches_sklearn_likelihood():
    x, means, sds = three_clusters(3000)
    fit = fit_diagonal_gmm(torch.tensor(x), 3, seed=0)
    order = np.argsort(fit.means[:, 0].numpy())
    assert np.allclose(fit.means.numpy()[order], means, atol=0.1)
    assert np.allclose(fit.variances.sqrt().numpy()[order], sds, atol=0.1)
    sk = GaussianMixture(3, covariance_type="diag", random_state=0, tol=1e-8).fit(x)
    assert fit.log_likelihood[-1] == pytest.approx(sk.score(x), abs=1e-4)


def test_em_pretraining_copies_the_mixture_into_the_cwm():
    x, _, _ = three_clusters()
    cwm = CWM(2, 3, map="flow").double()
    fit = em_pretrain(cwm, torch.tensor(x), seed=0)
    # scikit-learn's density with the same parameters is the independent reference.
    sk = GaussianMixture(3, covariance_type="diag")
    sk.weights_ = fit.weights.numpy()
    sk.means_ = fit.means.numpy()
    sk.covariances_ = fit.variances.numpy()
    sk.precisions_cholesky_ = 1 / np.sqrt(sk.covariances_)
    with torch.no_grad():
        ours = cwm().log_prob(torch.tensor(x)).numpy()
    assert np.allclose(ours, sk.score_samples(x), atol=1e-8)
    assert fit.log_likelihood[-1] == pytest.approx(ours.mean(), abs=1e-8)


def test_em_pretraining_of_a_conditional_cwm_ignores_the_context():
    x, _, _ = three_clusters(300)
    cwm = CWM(2, 3, context_dim=2).double()
    em_pretrain(cwm, torch.tensor(x), seed=0)
    with torch.no_grad():
        a = cwm(torch.zeros(300, 2, dtype=torch.float64)).log_prob(torch.tensor(x))
        b = cwm(torch.randn(300, 2, dtype=torch.float64)).log_prob(torch.tensor(x))
    assert torch.allclose(a, b)


def test_preserves_float32():
    x, _, _ = three_clusters(300)
    fit = fit_diagonal_gmm(torch.tensor(x, dtype=torch.float32), 3, seed=0)
    assert fit.means.dtype == torch.float32


class TestBadInput:
    def test_nan(self):
        x, _, _ = three_clusters(30)
        x[4, 1] = np.nan
        with pytest.raises(ValueError, match="data contains NaN or inf"):
            fit_diagonal_gmm(x, 2)

    def test_wrong_shape(self):
        with pytest.raises(ValueError, match="2-D"):
            fit_diagonal_gmm(np.zeros(10), 2)

    def test_k_larger_than_distinct_points(self):
        x = np.repeat([[0.0, 1.0], [2.0, 3.0]], 10, axis=0)
        with pytest.raises(ValueError, match="distinct"):
            fit_diagonal_gmm(x, 3)

    def test_k_below_one(self):
        with pytest.raises(ValueError, match="num_components"):
            fit_diagonal_gmm(np.zeros((5, 2)), 0)

    def test_dimension_mismatch_with_cwm(self):
        with pytest.raises(ValueError, match="columns"):
            em_pretrain(CWM(3, 2), np.zeros((10, 2)))

    def test_negative_reg_covar(self):
        with pytest.raises(ValueError, match="reg_covar"):
            fit_diagonal_gmm(np.random.default_rng(0).random((10, 2)), 2, reg_covar=-1.0)
