"""EM pretraining of a CWM: the CWM's density equals the fitted mixture's."""

import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture

from inference import em_pretrain
from pyro_cwm import CWM
from tests.inference.test_em import three_clusters


def test_em_pretraining_copies_the_mixture_into_the_cwm():
    x, _, _ = three_clusters()
    cwm = CWM(2, 3, map="flow").double()
    gm = em_pretrain(cwm, torch.tensor(x), random_state=0)
    params = gm.parameters()
    # scikit-learn's density with the same parameters is the independent reference.
    sk = GaussianMixture(3, covariance_type="diag")
    sk.weights_ = params.weights.numpy()
    sk.means_ = params.means.numpy()
    sk.covariances_ = params.covariances.numpy()
    sk.precisions_cholesky_ = 1 / np.sqrt(sk.covariances_)
    with torch.no_grad():
        ours = cwm().log_prob(torch.tensor(x)).numpy()
    assert np.allclose(ours, sk.score_samples(x), atol=1e-8)
    assert gm.score(torch.tensor(x)) == pytest.approx(ours.mean(), abs=1e-8)


def test_em_pretraining_of_a_conditional_cwm_ignores_the_context():
    x, _, _ = three_clusters(300)
    cwm = CWM(2, 3, context_dim=2).double()
    em_pretrain(cwm, torch.tensor(x), random_state=0)
    with torch.no_grad():
        a = cwm(torch.zeros(300, 2, dtype=torch.float64)).log_prob(torch.tensor(x))
        b = cwm(torch.randn(300, 2, dtype=torch.float64)).log_prob(torch.tensor(x))
    assert torch.allclose(a, b)


def test_dimension_mismatch_with_cwm():
    with pytest.raises(ValueError, match="columns"):
        em_pretrain(CWM(3, 2), np.zeros((10, 2)))
