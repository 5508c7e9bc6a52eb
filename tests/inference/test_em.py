"""The EM loop: monotone likelihood, chunk invariance, memmaps and stepwise EM."""

import numpy as np
import pytest
import torch

from inference import GaussianMixtureEM
from inference.em.families import chunk_statistics, m_step, second_order_features
from inference.em.loop import centered_expectation, expectation, feature_chunks, run_em
from pyro_cwm.distributions.gaussian_mixture import COVARIANCE_TYPES


def three_clusters(n=900, seed=0):
    rng = np.random.default_rng(seed)
    means = np.array([[-4.0, 0.0], [0.0, 3.0], [4.0, -1.0]])
    sds = np.array([[0.5, 1.0], [1.0, 0.3], [0.7, 0.7]])
    labels = rng.integers(0, 3, n)
    return means[labels] + sds[labels] * rng.standard_normal((n, 2)), means, sds


def random_start(x, k, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    resp = torch.rand(x.shape[0], k, generator=g, dtype=x.dtype)
    resp = resp / resp.sum(1, keepdim=True)
    stats = chunk_statistics(second_order_features(x, kind), resp.T, x.new_zeros(len(x)), kind, 2)
    return m_step(stats, kind, 0.0, 1.0)


@pytest.mark.parametrize("centered", [False, True])
@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
def test_log_likelihood_never_decreases_without_regularization(kind, centered):
    x = torch.tensor(three_clusters()[0])
    run = run_em(
        lambda: [x], random_start(x, 4, kind), kind, max_iter=40, tol=0.0, reg_covar=0.0,
        centered=centered,
    )
    assert run.n_iter == 40
    assert (np.diff(run.lower_bounds) >= -1e-10).all()


@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
def test_chunked_statistics_equal_one_pass(kind):
    x = torch.tensor(three_clusters()[0])
    params = random_start(x, 4, kind)
    whole = expectation(feature_chunks([x], kind), params, kind)
    chunked = expectation(feature_chunks(torch.split(x, 77), kind), params, kind)
    for name in ("count", "log_likelihood", "resp", "first", "second"):
        assert torch.allclose(getattr(whole, name), getattr(chunked, name), rtol=1e-12)
    whole = centered_expectation([x], params, kind)
    chunked = centered_expectation(torch.split(x, 77), params, kind)
    for name in ("count", "log_likelihood", "resp", "first", "second"):
        assert torch.allclose(getattr(whole, name), getattr(chunked, name), rtol=1e-12)


@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
def test_both_schemes_give_the_same_em_step(kind):
    x = torch.tensor(three_clusters()[0])
    params = random_start(x, 4, kind)
    a = m_step(expectation(feature_chunks([x], kind), params, kind), kind, 1e-6, 1.0)
    b = m_step(centered_expectation([x], params, kind), kind, 1e-6, 1.0)
    for name in ("weights", "means", "covariances", "precisions_cholesky"):
        assert torch.allclose(getattr(a, name), getattr(b, name), rtol=1e-9, atol=1e-12), name


def test_chunk_size_does_not_change_the_fit():
    x = three_clusters()[0]
    a = GaussianMixtureEM(3, random_state=0, tol=1e-8).fit(x)
    b = GaussianMixtureEM(3, random_state=0, tol=1e-8, chunk_size=50).fit(x)
    assert a.n_iter_ == b.n_iter_
    assert np.allclose(a.means_, b.means_, rtol=1e-10)
    assert a.lower_bound_ == pytest.approx(b.lower_bound_, rel=1e-12)


def test_memmap_is_read_in_chunks_and_gives_the_in_memory_fit(tmp_path):
    x = three_clusters(2000)[0]
    path = tmp_path / "x.dat"
    stored = np.memmap(path, dtype=np.float64, mode="w+", shape=x.shape)
    stored[:] = x
    stored.flush()
    mapped = np.memmap(path, dtype=np.float64, mode="r", shape=x.shape)
    options = dict(covariance_type="diag", random_state=0, tol=1e-8, chunk_size=128)
    a = GaussianMixtureEM(3, **options).fit(x)
    b = GaussianMixtureEM(3, **options).fit(mapped)
    assert np.allclose(a.means_, b.means_, rtol=1e-10)
    assert np.allclose(a.score_samples(x), b.score_samples(mapped), rtol=1e-10)


def test_memmap_with_nan_is_refused(tmp_path):
    x = three_clusters(300)[0]
    x[250, 0] = np.nan
    path = tmp_path / "x.dat"
    stored = np.memmap(path, dtype=np.float64, mode="w+", shape=x.shape)
    stored[:] = x
    with pytest.raises(ValueError, match="NaN"):
        GaussianMixtureEM(3, chunk_size=100).fit(stored)


@pytest.mark.parametrize("kind", ["full", "diag"])
def test_stepwise_em_on_a_stream_reaches_the_batch_likelihood(kind):
    x, _, _ = three_clusters(20_000, seed=1)
    batch = GaussianMixtureEM(3, covariance_type=kind, random_state=0).fit(x)
    online = GaussianMixtureEM(3, covariance_type=kind, random_state=0)
    for chunk in np.array_split(x, 100):
        online.partial_fit(chunk)
    assert online.n_iter_ == 100
    assert online.score(x) == pytest.approx(batch.score(x), abs=5e-3)
    order_a, order_b = np.argsort(batch.means_[:, 0]), np.argsort(online.means_[:, 0])
    assert np.allclose(batch.means_[order_a], online.means_[order_b], atol=0.05)


def test_stepwise_em_first_batch_smaller_than_k():
    with pytest.raises(ValueError, match="n_samples >= n_components"):
        GaussianMixtureEM(5).partial_fit(np.zeros((3, 2)))


def test_partial_fit_checks_the_number_of_features():
    gm = GaussianMixtureEM(2, random_state=0).partial_fit(three_clusters(100)[0])
    with pytest.raises(ValueError, match="features"):
        gm.partial_fit(np.zeros((10, 3)))
