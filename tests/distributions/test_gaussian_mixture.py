"""GaussianMixture against scipy: densities of every family, moments, samples, validation."""

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.special import logsumexp

from pyro_cwm import GaussianMixture
from pyro_cwm.distributions.gaussian_mixture import COVARIANCE_TYPES

K, D = 3, 4


def random_mixture(kind, dtype=torch.float64, seed=0, batch=()):
    """A mixture of the family and its dense covariances (K, d, d) as the reference."""
    g = torch.Generator().manual_seed(seed)
    loc = 3 * torch.randn(*batch, K, D, generator=g, dtype=dtype)
    probs = torch.rand(*batch, K, generator=g, dtype=dtype) + 0.2
    probs = probs / probs.sum(-1, keepdim=True)
    if kind == "full":
        a = torch.randn(*batch, K, D, D, generator=g, dtype=dtype)
        cov = a @ a.mT + 0.3 * torch.eye(D, dtype=dtype)
        scale = torch.linalg.cholesky(cov)
    elif kind == "tied":
        a = torch.randn(*batch, D, D, generator=g, dtype=dtype)
        scale = torch.linalg.cholesky(a @ a.mT + 0.3 * torch.eye(D, dtype=dtype))
        cov = (scale @ scale.mT).unsqueeze(-3).expand(*batch, K, D, D)
    elif kind == "diag":
        scale = torch.rand(*batch, K, D, generator=g, dtype=dtype) + 0.3
        cov = torch.diag_embed(scale**2)
    elif kind == "spherical":
        scale = torch.rand(*batch, K, generator=g, dtype=dtype) + 0.3
        cov = torch.diag_embed((scale**2).unsqueeze(-1).expand(*batch, K, D))
    else:
        scale = torch.tensor(0.8, dtype=dtype).expand(batch)
        cov = torch.diag_embed(torch.full((*batch, K, D), 0.64, dtype=dtype))
    return GaussianMixture(loc, scale, kind, probs=probs, validate_args=True), cov


def scipy_log_prob(dist, cov, x):
    loc, w = dist.loc.numpy(), dist.probs.numpy()
    comps = np.stack(
        [stats.multivariate_normal(loc[k], cov[k].numpy()).logpdf(x) for k in range(K)], -1
    )
    return logsumexp(comps + np.log(w), -1), comps


@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
def test_log_prob_matches_scipy(kind):
    dist, cov = random_mixture(kind)
    x = 3 * torch.randn(50, D, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref, comps = scipy_log_prob(dist, cov, x.numpy())
    assert np.allclose(dist.log_prob(x).numpy(), ref, rtol=1e-12, atol=1e-10)
    assert np.allclose(dist.component_log_probs(x).numpy(), comps, rtol=1e-12, atol=1e-10)
    post = dist.posterior_log_probs(x).exp()
    assert torch.allclose(post.sum(-1), torch.ones(50, dtype=torch.float64))


@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
def test_float32_stays_accurate_far_from_the_origin(kind):
    dist64, cov = random_mixture(kind)
    shift = 1e3  # points and means near 1000: expanded squares would lose digits
    dist64 = GaussianMixture(dist64.loc + shift, dist64.scale, kind, probs=dist64.probs)
    x = dist64.sample((200,))
    dist32 = GaussianMixture(
        dist64.loc.float(), dist64.scale.float(), kind, probs=dist64.probs.float()
    )
    lp32 = dist32.log_prob(x.float())
    assert lp32.dtype == torch.float32
    assert torch.allclose(lp32.double(), dist64.log_prob(x), atol=2e-3)


@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
def test_batched_log_prob_and_expand(kind):
    dist, _ = random_mixture(kind, batch=(2,))
    assert dist.batch_shape == (2,) and dist.event_shape == (D,)
    x = torch.randn(5, 2, D, dtype=torch.float64)
    for b in range(2):
        single, cov = random_mixture(kind, batch=(2,))
        one = GaussianMixture(
            single.loc[b], single.scale[b], kind, probs=single.probs[b]
        )
        assert torch.allclose(dist.log_prob(x)[:, b], one.log_prob(x[:, b]))
    expanded = dist.expand((3, 2))
    assert expanded.batch_shape == (3, 2)
    assert expanded.log_prob(x[0]).shape == (3, 2)
    assert expanded.sample((4,)).shape == (4, 3, 2, D)


@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
def test_samples_reproduce_component_moments(kind):
    dist, cov = random_mixture(kind)
    torch.manual_seed(0)
    n = 60_000
    x, k = dist.sample_with_components((n,))
    counts = torch.bincount(k, minlength=K).double()
    # Component shares: binomial 5-sigma bounds.
    sd = (dist.probs * (1 - dist.probs) / n).sqrt()
    assert ((counts / n - dist.probs).abs() < 5 * sd).all()
    for j in range(K):
        xj = x[k == j]
        nj = xj.shape[0]
        var = cov[j].diagonal()
        assert ((xj.mean(0) - dist.loc[j]).abs() < 5 * (var / nj).sqrt()).all()
        # Sample covariance entries: sd of the estimate ~ sqrt((s_ii s_jj + s_ij^2) / n).
        emp = torch.cov(xj.T)
        tol = 5 * ((var[:, None] * var[None, :] + cov[j] ** 2) / nj).sqrt()
        assert ((emp - cov[j]).abs() < tol).all()


@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
def test_mixture_moments(kind):
    dist, cov = random_mixture(kind)
    w, mu = dist.probs, dist.loc
    mean = (w[:, None] * mu).sum(0)
    second = (w[:, None, None] * (cov + mu[:, :, None] * mu[:, None, :])).sum(0)
    assert torch.allclose(dist.mean, mean)
    assert torch.allclose(dist.covariance_matrix, second - torch.outer(mean, mean))
    assert torch.allclose(dist.variance, dist.covariance_matrix.diagonal())
    assert torch.allclose(dist.component_covariances, cov)


def test_logits_and_probs_agree():
    dist, _ = random_mixture("diag")
    other = GaussianMixture(dist.loc, dist.scale, "diag", logits=dist.probs.log() + 7.0)
    x = torch.randn(10, D, dtype=torch.float64)
    assert torch.allclose(dist.log_prob(x), other.log_prob(x))


class TestValidation:
    def test_unknown_family(self):
        with pytest.raises(ValueError, match="covariance_type"):
            GaussianMixture(torch.zeros(2, 3), torch.ones(2, 3), "banded", logits=torch.zeros(2))

    def test_scale_shape_names_the_family(self):
        with pytest.raises(ValueError, match="scale of a 'full' mixture"):
            GaussianMixture(torch.zeros(2, 3), torch.ones(2, 3), "full", logits=torch.zeros(2))

    def test_weights_shape(self):
        with pytest.raises(ValueError, match="logits must have shape"):
            GaussianMixture(torch.zeros(2, 3), torch.ones(2, 3), "diag", logits=torch.zeros(3))

    def test_both_or_no_weights(self):
        with pytest.raises(ValueError, match="exactly one of probs and logits"):
            GaussianMixture(torch.zeros(2, 3), torch.ones(2, 3), "diag")

    def test_negative_scale(self):
        with pytest.raises(ValueError, match="scale"):
            GaussianMixture(
                torch.zeros(2, 3), -torch.ones(2, 3), "diag", logits=torch.zeros(2),
                validate_args=True,
            )

    def test_not_a_cholesky_factor(self):
        with pytest.raises(ValueError, match="scale"):
            GaussianMixture(
                torch.zeros(2, 3), torch.ones(2, 3, 3), "full", logits=torch.zeros(2),
                validate_args=True,
            )

    def test_value_of_the_wrong_size(self):
        dist, _ = random_mixture("diag")
        with pytest.raises(ValueError):
            dist.log_prob(torch.zeros(5, D + 1, dtype=torch.float64))
