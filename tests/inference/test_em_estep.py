"""The fast E-step (inference.em.estep): the same statistics as the reference schemes.

The reference is the plain feature scheme of ``inference.em.loop.expectation`` in float64
(and the centered scheme where that one is not accurate); float32 is held to float64 and
to scikit-learn, and the rule that picks the scheme to its accuracy bound.
"""

import math
import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.mixture import GaussianMixture

from inference import GaussianMixtureEM
from inference.em.estep import (
    EStep,
    exp_floor,
    origin_is_accurate,
    origin_kappa,
    origin_log_joint,
    responsibilities_,
)
from inference.em.families import chunk_statistics, m_step, second_order_features
from inference.em.loop import (
    centered_expectation,
    expectation,
    feature_chunks,
    run_em,
    weighted_log_probs,
)
from pyro_cwm.distributions.gaussian_mixture import COVARIANCE_TYPES

NAMES = ("count", "log_likelihood", "resp", "first", "second")


def clusters(n=1200, d=3, k=4, seed=0, spread=3.0, offset=0.0, dtype=torch.float64):
    """Clusters with random means (``spread``) around ``offset``; the data mean removed."""
    g = torch.Generator().manual_seed(seed)
    means = spread * torch.randn(k, d, generator=g, dtype=torch.float64) + offset
    scales = 0.5 + torch.rand(k, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, k, (n,), generator=g)
    x = means[labels] + scales[labels] * torch.randn(n, d, generator=g, dtype=torch.float64)
    return (x - x.mean(0)).to(dtype)


def random_start(x, k, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    resp = torch.rand(x.shape[0], k, generator=g, dtype=x.dtype)
    resp = resp / resp.sum(1, keepdim=True)
    features = second_order_features(x, kind)
    stats = chunk_statistics(features, resp.T, x.new_zeros(len(x)), kind, x.shape[1])
    return m_step(stats, kind, 1e-6, 1.0)


def assert_same_statistics(a, b, rtol):
    for name in NAMES:
        left, right = getattr(a, name), getattr(b, name).to(getattr(a, name).dtype)
        assert left.shape == right.shape, name
        scale = left.abs().max().clamp_min(1.0)
        assert ((left - right).abs().max() / scale).item() <= rtol, name


@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
def test_fast_e_step_equals_the_feature_scheme(kind):
    x = clusters()
    params = random_start(x, 4, kind)
    reference = expectation(feature_chunks([x], kind), params, kind)
    e_step = EStep(kind)
    assert_same_statistics(reference, e_step([x], params), 1e-12)
    # Chunks of another size, and a second call on the same data (tied keeps its scatter).
    assert_same_statistics(reference, e_step(torch.split(x, 77), params), 1e-12)
    assert_same_statistics(reference, e_step(torch.split(x, 500), params), 1e-12)


@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
def test_float32_statistics_are_summed_in_float64(kind):
    x = clusters(n=3000)
    params = random_start(x, 4, kind)
    reference = expectation(feature_chunks([x], kind), params, kind)
    stats = EStep(kind)(torch.split(x.float(), 256), params.to(dtype=torch.float32))
    assert stats.first.dtype == torch.float64 and stats.log_likelihood.dtype == torch.float64
    assert_same_statistics(reference, stats, 2e-6)


@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
def test_origin_log_joint_equals_the_centered_one(kind):
    x = clusters()
    params = random_start(x, 4, kind)
    a = weighted_log_probs(x, params, kind, centered=False)
    b = weighted_log_probs(x, params, kind, centered=True)
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-10)
    if kind not in ("full", "tied", "diag", "spherical"):
        return  # scikit-learn has no such family; the centered formula above checks it
    # Against scikit-learn with the same parameters: densities and responsibilities.
    sklearn = GaussianMixture(4, covariance_type=kind)
    sklearn.weights_, sklearn.means_ = params.weights.numpy(), params.means.numpy()
    sklearn.precisions_cholesky_ = params.precisions_cholesky.numpy()
    log_joint = origin_log_joint(x, params, kind)
    expected = torch.from_numpy(sklearn.score_samples(x.numpy()))
    assert torch.allclose(torch.logsumexp(log_joint, 0), expected, rtol=1e-12, atol=1e-12)
    expected = torch.from_numpy(sklearn.predict_proba(x.numpy())).T
    assert torch.allclose(log_joint.softmax(0), expected, atol=1e-12)


def test_responsibilities_skip_the_slow_exponentials_without_changing_the_sums():
    log_joint = torch.tensor([[0.0, -1000.0, -50.0], [-800.0, 0.0, -50.0]], dtype=torch.float64)
    expected = torch.logsumexp(log_joint, 0)
    top, total = torch.empty(1, 3, dtype=torch.float64), torch.empty(1, 3, dtype=torch.float64)
    log_norm = responsibilities_(log_joint, top, total)
    assert torch.allclose(log_norm, expected, rtol=1e-15)
    assert torch.allclose(log_joint.sum(0), torch.ones(3, dtype=torch.float64))
    assert log_joint.min().item() == pytest.approx(math.exp(exp_floor(torch.float64)))
    assert log_joint[0, 2].item() == pytest.approx(0.5)


@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
def test_the_rule_keeps_the_origin_near_the_mean_and_whitens_far_from_it(kind):
    near = clusters(n=600, d=4)
    params = random_start(near, 3, kind)
    assert origin_is_accurate(params.to(dtype=torch.float32), kind)
    far = params.shifted(torch.full((4,), -1000.0, dtype=torch.float64))  # means at 1000
    assert origin_kappa(far, kind) > 1e5
    assert not origin_is_accurate(far.to(dtype=torch.float32), kind)
    assert origin_is_accurate(far, kind)  # float64 has the digits


def far_apart(kind):
    """The far-apart clusters of the float32 tests, and the parameters of their labels."""
    rng = np.random.default_rng(0)
    centers = np.zeros((3, 4))
    centers[0, 0], centers[1, 0], centers[2, 1] = -1000.0, 1000.0, 1000.0
    labels = rng.integers(0, 3, 3000)
    x = centers[labels] + rng.standard_normal((3000, 4))
    x = torch.tensor(x - x.mean(0))
    resp = torch.nn.functional.one_hot(torch.tensor(labels), 3).double()
    stats = chunk_statistics(second_order_features(x, kind), resp.T, x.new_zeros(3000), kind, 4)
    return x.float(), m_step(stats, kind, 1e-6, 1.0).to(dtype=torch.float32)


@pytest.mark.parametrize("kind", ["full", "diag"])
def test_run_em_picks_its_scheme_by_the_rule(kind):
    near = clusters(n=900, d=4, dtype=torch.float32)
    run = run_em(lambda: torch.split(near, 200), random_start(near.double(), 3, kind)
                 .to(dtype=torch.float32), kind, max_iter=5, tol=0.0, reg_covar=1e-6,
                 centered=None)
    assert run.centered_steps == 0 and run.params.means.dtype == torch.float32
    far, start = far_apart(kind)
    run = run_em(lambda: [far], start, kind, max_iter=5, tol=0.0, reg_covar=1e-6,
                 centered=None)
    assert run.centered_steps == 5


@pytest.mark.parametrize("kind", ["full", "tied", "diag", "spherical"])
def test_float32_fit_matches_sklearn(kind):
    # Same start, same 15 iterations: the float32 fit's log-likelihood (scored in float64
    # by scikit-learn's formula) within 1e-6 of scikit-learn's float64 fit.
    g = torch.Generator().manual_seed(1)
    x = (clusters(n=4000, d=6, k=5, spread=2.5) + 7.0 * torch.randn(6, generator=g,
         dtype=torch.float64)).numpy()
    start = GaussianMixture(5, covariance_type=kind, max_iter=1, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        start.fit(x)
        init = dict(weights_init=start.weights_, means_init=start.means_,
                    precisions_init=start.precisions_)
        ref = GaussianMixture(5, covariance_type=kind, max_iter=15, tol=0.0, **init).fit(x)
        ours = GaussianMixtureEM(5, covariance_type=kind, max_iter=15, tol=0.0, **init)
        ours.fit(x.astype(np.float32))
    assert ours._centered_steps == 0  # the fast scheme ran
    scored = GaussianMixture(5, covariance_type=kind)
    scored.weights_ = ours.weights_.astype(np.float64)
    scored.means_ = ours.means_.astype(np.float64)
    scored.precisions_cholesky_ = ours.precisions_cholesky_.astype(np.float64)
    assert scored.score(x) == pytest.approx(ref.score(x), rel=1e-6)
    assert ours.score(x.astype(np.float32)) == pytest.approx(ref.score(x), rel=1e-5)
    assert np.allclose(ours.means_, ref.means_, atol=1e-3)


def test_centered_and_fast_e_steps_agree_in_float32_where_the_rule_allows():
    x = clusters(n=2000, d=5, dtype=torch.float32)
    for kind in COVARIANCE_TYPES:
        params = random_start(x.double(), 4, kind).to(dtype=torch.float32)
        assert origin_is_accurate(params, kind)
        a = m_step(EStep(kind)(torch.split(x, 300), params), kind, 1e-6, 1.0)
        b = m_step(centered_expectation(torch.split(x, 300), params, kind), kind, 1e-6, 1.0)
        for name in ("weights", "means", "covariances"):
            left, right = getattr(a, name), getattr(b, name).double()
            assert torch.allclose(left, right, rtol=1e-4, atol=1e-5), (kind, name)
