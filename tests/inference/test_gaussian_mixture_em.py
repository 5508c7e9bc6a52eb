"""GaussianMixtureEM against scikit-learn's GaussianMixture, scipy and known parameters.

The properties are those scikit-learn tests its own estimator by: same start, same fit;
normalized responsibilities; monotone likelihood; recovery; fit_predict consistency;
parameter counts; sampling; degenerate and bad input; dtypes.
"""

import itertools
import warnings

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import logsumexp
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.mixture import GaussianMixture

from inference import GaussianMixtureEM
from pyro_cwm.distributions.gaussian_mixture import COVARIANCE_TYPES

SKLEARN_TYPES = ["full", "tied", "diag", "spherical"]


def blobs(n=600, d=3, k=3, seed=0, spread=4.0):
    """Gaussian clusters with random full covariances: (x, labels, means, covariances)."""
    rng = np.random.default_rng(seed)
    means = spread * rng.standard_normal((k, d))
    factors = rng.standard_normal((k, d, d)) * 0.6
    covs = factors @ factors.transpose(0, 2, 1) + 0.2 * np.eye(d)
    labels = rng.integers(0, k, n)
    noise = np.einsum("nij,nj->ni", np.linalg.cholesky(covs)[labels], rng.standard_normal((n, d)))
    return means[labels] + noise, labels, means, covs


def quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return function(*args, **kwargs)


@pytest.mark.parametrize("kind", SKLEARN_TYPES)
def test_same_start_same_fit_as_sklearn(kind):
    x, *_ = blobs()
    start = quiet(GaussianMixture(4, covariance_type=kind, max_iter=1, random_state=3).fit, x)
    options = dict(
        covariance_type=kind,
        weights_init=start.weights_,
        means_init=start.means_,
        precisions_init=start.precisions_,
        tol=1e-6,
        max_iter=200,
    )
    ref = GaussianMixture(4, **options).fit(x)
    ours = GaussianMixtureEM(4, **options).fit(x)
    assert ours.n_iter_ == ref.n_iter_ and ours.converged_ == ref.converged_
    assert ours.lower_bound_ == pytest.approx(ref.lower_bound_, rel=1e-10)
    assert np.allclose(ours.lower_bounds_, ref.lower_bounds_, rtol=1e-8)
    for name in ("weights_", "means_", "covariances_", "precisions_", "precisions_cholesky_"):
        assert np.allclose(getattr(ours, name), getattr(ref, name), rtol=1e-5, atol=1e-10), name
    assert np.allclose(ours.score_samples(x), ref.score_samples(x), rtol=1e-8)
    assert np.allclose(ours.predict_proba(x), ref.predict_proba(x), atol=1e-8)


def numpy_constant_em(x, weights, means, variance, iterations):
    """EM with every covariance fixed to ``variance * I``, written with scipy."""
    for _ in range(iterations):
        comps = np.stack(
            [stats.multivariate_normal(m, variance).logpdf(x) for m in means], -1
        ) + np.log(weights)
        resp = np.exp(comps - logsumexp(comps, -1, keepdims=True))
        nk = resp.sum(0)
        weights, means = nk / len(x), resp.T @ x / nk[:, None]
    return weights, means


def test_constant_family_matches_an_em_written_with_scipy():
    x, *_ = blobs()
    w0, m0 = np.full(3, 1 / 3), x[[0, 1, 2]]
    ours = quiet(
        GaussianMixtureEM(
            3, covariance_type="constant", constant_variance=2.0, weights_init=w0,
            means_init=m0, max_iter=15, tol=0.0,
        ).fit,
        x,
    )
    weights, means = numpy_constant_em(x, w0, m0, 2.0, 15)
    assert np.allclose(ours.weights_, weights, rtol=1e-8)
    assert np.allclose(ours.means_, means, rtol=1e-8)
    assert ours.covariances_ == pytest.approx(2.0)
    ref = logsumexp(
        np.stack([stats.multivariate_normal(m, 2.0).logpdf(x) for m in means], -1)
        + np.log(weights), -1,
    )
    assert np.allclose(ours.score_samples(x), ref, rtol=1e-6)


@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
def test_likelihood_never_decreases_without_regularization(kind):
    x, *_ = blobs()
    gm = quiet(
        GaussianMixtureEM(3, covariance_type=kind, reg_covar=0.0, tol=0.0, max_iter=30,
                          random_state=0, init_params="random").fit,
        x,
    )
    assert gm.n_iter_ == 30
    assert (np.diff(gm.lower_bounds_) >= -1e-10).all()


def test_recovers_known_parameters_up_to_permutation():
    x, labels, means, covs = blobs(n=6000, d=2, seed=1, spread=6.0)
    gm = GaussianMixtureEM(3, random_state=0, tol=1e-6).fit(x)
    best = min(
        itertools.permutations(range(3)),
        key=lambda p: np.abs(gm.means_[list(p)] - means).sum(),
    )
    perm = list(best)
    assert np.allclose(gm.means_[perm], means, atol=0.1)
    assert np.allclose(gm.covariances_[perm], covs, atol=0.12)
    assert np.allclose(gm.weights_[perm], np.bincount(labels) / len(x), atol=0.01)
    # The labels agree with the truth up to the same permutation.
    assert (np.array(perm)[gm.predict(x)] == labels).mean() > 0.97 or (
        np.argsort(perm)[gm.predict(x)] == labels
    ).mean() > 0.97


@pytest.mark.parametrize("init", ["kmeans", "k-means++", "random", "random_from_data"])
@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
def test_fit_predict_equals_fit_then_predict(init, kind):
    x, *_ = blobs(300)
    options = dict(covariance_type=kind, init_params=init, random_state=2, max_iter=5)
    a = quiet(GaussianMixtureEM(3, **options).fit_predict, x)
    b = quiet(GaussianMixtureEM(3, **options).fit, x).predict(x)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
def test_responsibilities_are_bayes_rule(kind):
    x, *_ = blobs(200)
    gm = GaussianMixtureEM(3, covariance_type=kind, random_state=0).fit(x)
    dist = gm.distribution()
    covs = dist.component_covariances.numpy()
    joint = np.stack(
        [stats.multivariate_normal(gm.means_[k], covs[k]).logpdf(x) for k in range(3)], -1
    ) + np.log(gm.weights_)
    proba = gm.predict_proba(x)
    assert np.allclose(proba.sum(1), 1.0)
    assert np.allclose(proba, np.exp(joint - logsumexp(joint, -1, keepdims=True)), atol=1e-10)
    assert np.allclose(gm.score_samples(x), logsumexp(joint, -1), rtol=1e-10)
    assert gm.score(x) == pytest.approx(logsumexp(joint, -1).mean(), rel=1e-10)
    assert np.allclose(dist.log_prob(torch.tensor(x)).numpy(), gm.score_samples(x), rtol=1e-10)


@pytest.mark.parametrize("kind", SKLEARN_TYPES)
def test_bic_and_aic_count_parameters_like_sklearn(kind):
    x, *_ = blobs(300, d=4)
    ours = GaussianMixtureEM(3, covariance_type=kind, random_state=0).fit(x)
    ref = GaussianMixture(3, covariance_type=kind, random_state=0).fit(x)
    assert ours._n_parameters() == ref._n_parameters()
    n = len(x)
    assert ours.bic(x) == pytest.approx(-2 * ours.score(x) * n + ref._n_parameters() * np.log(n))
    assert ours.aic(x) == pytest.approx(-2 * ours.score(x) * n + 2 * ref._n_parameters())


def test_constant_family_counts_no_covariance_parameter():
    x, *_ = blobs(300, d=4)
    gm = GaussianMixtureEM(3, covariance_type="constant", random_state=0).fit(x)
    assert gm._n_parameters() == 3 * 4 + 2


@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
def test_samples_reproduce_the_fitted_components(kind):
    x, *_ = blobs(500, d=2)
    gm = GaussianMixtureEM(3, covariance_type=kind, random_state=0).fit(x)
    samples, labels = gm.sample(30_000)
    assert samples.shape == (30_000, 2) and labels.shape == (30_000,)
    covs = gm.distribution().component_covariances.numpy()
    for k in range(3):
        xk = samples[labels == k]
        assert len(xk) / 30_000 == pytest.approx(gm.weights_[k], abs=0.015)
        assert np.allclose(xk.mean(0), gm.means_[k], atol=5 * np.sqrt(covs[k].max() / len(xk)))
        assert np.allclose(np.cov(xk.T), covs[k], atol=0.1 * np.abs(covs[k]).max())
    again, _ = gm.sample(30_000)
    assert np.array_equal(samples, again)  # an int random_state makes sample deterministic


def test_n_init_keeps_the_best_start():
    x, *_ = blobs(400, k=5, seed=4)
    one = GaussianMixtureEM(5, n_init=1, random_state=0, init_params="random").fit(x)
    five = GaussianMixtureEM(5, n_init=5, random_state=0, init_params="random").fit(x)
    assert five.lower_bound_ >= one.lower_bound_ - 1e-12


def test_warm_start_continues_from_the_last_fit():
    x, *_ = blobs(400)
    gm = quiet(GaussianMixtureEM(3, warm_start=True, max_iter=2, random_state=0).fit, x)
    means = gm.means_.copy()
    quiet(gm.fit, x)
    cold = quiet(GaussianMixtureEM(3, max_iter=4, random_state=0).fit, x)
    assert not np.allclose(gm.means_, means)
    assert np.allclose(gm.means_, cold.means_, rtol=1e-10)


def test_convergence_warning_and_max_iter_zero():
    x, *_ = blobs(200)
    with pytest.warns(ConvergenceWarning, match="did not converge"):
        GaussianMixtureEM(3, max_iter=1, tol=0.0, random_state=0).fit(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gm = GaussianMixtureEM(3, max_iter=0, random_state=0).fit(x)
    assert gm.n_iter_ == 0 and not gm.converged_


class TestDtypesAndTensors:
    @pytest.mark.parametrize("dtype", [np.float32, np.float64])
    def test_numpy_dtype_is_preserved(self, dtype):
        x = blobs(200)[0].astype(dtype)
        gm = GaussianMixtureEM(3, random_state=0).fit(x)
        assert gm.means_.dtype == dtype and gm.covariances_.dtype == dtype
        assert gm.score_samples(x).dtype == dtype
        assert gm.sample(5)[0].dtype == dtype

    def test_integers_become_float64(self):
        x = np.round(blobs(200)[0] * 10).astype(np.int64)
        assert GaussianMixtureEM(2, random_state=0).fit(x).means_.dtype == np.float64

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
    def test_tensors_in_tensors_out(self, dtype):
        x = torch.tensor(blobs(200)[0], dtype=dtype)
        gm = GaussianMixtureEM(3, random_state=0).fit(x)
        assert isinstance(gm.means_, torch.Tensor) and gm.means_.dtype == dtype
        assert isinstance(gm.predict(x), torch.Tensor)
        labels = gm.predict(x.numpy())
        assert isinstance(labels, np.ndarray) and np.array_equal(labels, gm.predict(x).numpy())

    def test_float32_fit_agrees_with_float64(self):
        x = blobs(500)[0] + 1000.0  # far from the origin: the loop centers the data
        options = dict(random_state=0, tol=0.0, max_iter=30)
        a = quiet(GaussianMixtureEM(3, **options).fit, x)
        b = quiet(GaussianMixtureEM(3, dtype="float32", **options).fit, x)
        assert b.means_.dtype == np.float32
        assert np.allclose(a.means_, b.means_, atol=1e-2)
        assert b.score(x) == pytest.approx(a.score(x), abs=1e-3)


    @pytest.mark.parametrize("kind", COVARIANCE_TYPES)
    def test_float32_is_accurate_for_far_apart_tight_clusters(self, kind):
        # Moments about the origin would cancel catastrophically here in float32.
        rng = np.random.default_rng(0)
        centers = np.zeros((3, 4))
        centers[0, 0], centers[1, 0], centers[2, 1] = -1000.0, 1000.0, 1000.0
        x = centers[rng.integers(0, 3, 3000)] + rng.standard_normal((3000, 4))
        a = GaussianMixtureEM(3, covariance_type=kind, random_state=0).fit(x)
        b = GaussianMixtureEM(3, covariance_type=kind, random_state=0).fit(x.astype(np.float32))
        assert b.means_.dtype == np.float32
        assert np.allclose(b.covariances_, a.covariances_, atol=1e-4)
        assert b.score(x.astype(np.float32)) == pytest.approx(a.score(x), rel=1e-6)


class TestDegenerateData:
    def test_duplicate_points(self):
        x = np.repeat(blobs(40)[0], 25, axis=0)
        gm = GaussianMixtureEM(3, random_state=0).fit(x)
        assert np.isfinite(gm.score(x))

    def test_zero_variance_feature_is_held_by_reg_covar(self):
        x = blobs(300)[0]
        x[:, 1] = 5.0
        gm = GaussianMixtureEM(2, random_state=0).fit(x)
        assert np.isfinite(gm.score(x))
        assert np.allclose(gm.covariances_[:, 1, 1], 1e-6, rtol=1e-3)
        with pytest.raises(ValueError, match="increase reg_covar"):
            GaussianMixtureEM(2, reg_covar=0.0, random_state=0).fit(x)

    def test_more_components_than_distinct_points(self):
        x = np.repeat([[0.0, 1.0], [2.0, 3.0]], 10, axis=0)
        with pytest.raises(ValueError, match="distinct points"):
            GaussianMixtureEM(3, random_state=0).fit(x)


class TestBadInput:
    @pytest.mark.parametrize("value", [np.nan, np.inf])
    def test_nan_and_inf(self, value):
        x = blobs(30)[0]
        x[4, 1] = value
        with pytest.raises(ValueError, match="Input X contains"):
            GaussianMixtureEM(2).fit(x)
        with pytest.raises(ValueError, match="Input X contains NaN or infinity"):
            GaussianMixtureEM(2).fit(torch.tensor(x))
        gm = GaussianMixtureEM(2, random_state=0).fit(blobs(30)[0])
        with pytest.raises(ValueError, match="Input X contains"):
            gm.predict(x)

    @pytest.mark.parametrize("shape", [(10,), (2, 5, 2)])
    def test_wrong_number_of_dimensions(self, shape):
        with pytest.raises(ValueError, match="2D|dim 3"):
            GaussianMixtureEM(2).fit(np.zeros(shape))
        with pytest.raises(ValueError, match="2D"):
            GaussianMixtureEM(2).fit(torch.zeros(shape))

    def test_wrong_number_of_features_at_predict(self):
        gm = GaussianMixtureEM(2, random_state=0).fit(blobs(30)[0])
        with pytest.raises(ValueError, match="X has 2 features, but GaussianMixtureEM is"):
            gm.predict(np.zeros((4, 2)))
        with pytest.raises(ValueError, match="X has 2 features"):
            gm.score_samples(torch.zeros(4, 2))

    def test_unfitted(self):
        for method in ("predict", "predict_proba", "score", "score_samples"):
            with pytest.raises(NotFittedError):
                getattr(GaussianMixtureEM(2), method)(np.zeros((4, 2)))
        with pytest.raises(NotFittedError):
            GaussianMixtureEM(2).sample(3)

    def test_fewer_points_than_components(self):
        with pytest.raises(ValueError, match="n_samples >= n_components"):
            GaussianMixtureEM(5).fit(np.random.default_rng(0).random((4, 2)))

    @pytest.mark.parametrize(
        "options, name",
        [
            ({"n_components": 0}, "n_components"),
            ({"covariance_type": "banded"}, "covariance_type"),
            ({"init_params": "mystery"}, "init_params"),
            ({"tol": -1.0}, "tol"),
            ({"reg_covar": -1e-3}, "reg_covar"),
            ({"max_iter": 1.5}, "max_iter"),
            ({"n_init": 0}, "n_init"),
            ({"constant_variance": 0.0}, "constant_variance"),
            ({"weights_init": [0.5, 0.6]}, "weights_init"),
            ({"weights_init": [0.5, 0.3, 0.2]}, "weights_init"),
            ({"means_init": np.zeros((3, 3))}, "means_init"),
            ({"precisions_init": -np.ones(2), "covariance_type": "spherical"}, "precisions_init"),
            ({"dtype": "float16"}, "dtype"),
            ({"random_state": "seed"}, "random_state"),
        ],
    )
    def test_invalid_parameters_are_named(self, options, name):
        options = {"n_components": 2, **options}
        with pytest.raises(ValueError, match=name):
            GaussianMixtureEM(**options).fit(blobs(30)[0])

    def test_sample_size(self):
        gm = GaussianMixtureEM(2, random_state=0).fit(blobs(30)[0])
        with pytest.raises(ValueError, match="n_samples"):
            gm.sample(0)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
def test_cuda_fit_equals_cpu_fit(kind):
    x = torch.tensor(blobs(2000)[0])
    options = dict(covariance_type=kind, random_state=0, tol=1e-8)
    cpu = GaussianMixtureEM(3, **options).fit(x)
    gpu = GaussianMixtureEM(3, **options).fit(x.cuda())
    assert gpu.means_.device.type == "cuda"
    assert torch.allclose(gpu.means_.cpu(), cpu.means_, rtol=1e-6)
    assert gpu.score(x.cuda()) == pytest.approx(cpu.score(x), rel=1e-8)
    on_device = GaussianMixtureEM(3, device="cuda", **options).fit(x.numpy())
    assert isinstance(on_device.means_, np.ndarray)
    assert np.allclose(on_device.means_, cpu.means_.numpy(), rtol=1e-6)
