"""The GMM module: same density as the EM fit, zero gradient at the EM optimum, Adam fits."""

import pytest
import torch

from inference import GaussianMixtureEM, fit_density
from pyro_cwm.distributions.gaussian_mixture import COVARIANCE_TYPES
from pyro_cwm.nn import GMM
from tests.inference.test_em import three_clusters


@pytest.mark.parametrize("kind", COVARIANCE_TYPES)
def test_loaded_em_fit_has_the_estimators_density(kind):
    x = three_clusters(400)[0]
    gm = GaussianMixtureEM(3, covariance_type=kind, random_state=0).fit(torch.tensor(x))
    gmm = GMM(2, 3, kind).double()
    p = gm.parameters()
    gmm.set_parameters(p.weights, p.means, p.covariances)
    with torch.no_grad():
        ours = gmm().log_prob(torch.tensor(x))
    assert torch.allclose(ours, gm.score_samples(torch.tensor(x)), rtol=1e-10)


@pytest.mark.parametrize("kind", ["full", "tied", "diag", "spherical"])
def test_gradient_vanishes_at_the_em_optimum(kind):
    # EM's fixed point is a stationary point of the likelihood: autograd through the
    # distribution must agree (an independent check of both).
    x = torch.tensor(three_clusters(600)[0])
    gm = GaussianMixtureEM(
        3, covariance_type=kind, reg_covar=0.0, tol=1e-14, max_iter=5000, random_state=0
    ).fit(x)
    assert gm.converged_
    gmm = GMM(2, 3, kind).double()
    p = gm.parameters()
    gmm.set_parameters(p.weights, p.means, p.covariances)
    loss = -gmm().log_prob(x).mean()
    loss.backward()
    for name, param in gmm.named_parameters():
        assert param.grad.abs().max() < 1e-5, name


@pytest.mark.parametrize("kind", ["full", "diag"])
def test_adam_reaches_the_em_likelihood(kind):
    x = torch.tensor(three_clusters(1500)[0], dtype=torch.float32)
    em = GaussianMixtureEM(3, covariance_type=kind, random_state=0).fit(x)
    start = GaussianMixtureEM(3, covariance_type=kind, max_iter=0, random_state=1).fit(x)
    gmm = GMM(2, 3, kind)
    p = start.parameters()  # k-means means; inflated covariances and equal weights
    gmm.set_parameters(torch.full((3,), 1 / 3), p.means + 0.5, 4 * p.covariances)
    before = -gmm().log_prob(x).mean().item()
    fit_density(gmm, x, epochs=60, batch_size=128, lr=0.05, validation=0.0, progress=False)
    with torch.no_grad():
        nll = -gmm().log_prob(x).mean().item()
    assert before > -em.score(x) + 0.05  # the start is far from the optimum
    assert nll == pytest.approx(-em.score(x), abs=0.01)


def test_constant_family_learns_means_and_weights_only():
    gmm = GMM(2, 3, "constant", constant_scale=0.5)
    assert {n for n, _ in gmm.named_parameters()} == {"logits", "loc"}
    assert torch.allclose(gmm().component_covariances, 0.25 * torch.eye(2).expand(3, 2, 2))


class TestBadInput:
    def test_family(self):
        with pytest.raises(ValueError, match="covariance_type"):
            GMM(2, 3, "banded")

    def test_sizes(self):
        with pytest.raises(ValueError, match="num_components"):
            GMM(2, 0)
        with pytest.raises(ValueError, match="constant_scale"):
            GMM(2, 2, "constant", constant_scale=0.0)

    def test_shapes_of_loaded_parameters(self):
        with pytest.raises(ValueError, match="covariances of a 'diag' GMM"):
            GMM(2, 3, "diag").set_parameters(torch.ones(3) / 3, torch.zeros(3, 2), torch.ones(3))

    def test_context_is_refused(self):
        with pytest.raises(ValueError, match="unconditional"):
            GMM(2, 3)(torch.zeros(1, 2))
