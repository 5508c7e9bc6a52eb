"""The Bayesian GMM model: argument checks, shapes, and its densities against scipy."""

import numpy as np
import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Predictive, TraceEnum_ELBO
from scipy import stats
from scipy.special import logsumexp

from pyro_cwm.models import BayesianGMM

DTYPE = torch.float64


def _data(n=30, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], dtype=DTYPE)
    return centers[torch.arange(n) % 3] + torch.randn(n, 2, generator=generator, dtype=DTYPE)


def _prior_draw(model, seed=0):
    """One draw of the globals from the prior (float64)."""
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)
    try:
        trace = poutine.trace(model).get_trace(None, num_points=1)
    finally:
        torch.set_default_dtype(default)
    return {name: trace.nodes[name]["value"] for name in model.global_sites}


def _scipy_log_joint(model, data, params):
    """log p(data, params) with every density from scipy (LKJ in d = 2 through its Beta
    marginal: (r + 1) / 2 ~ Beta(eta, eta), and L = [[1, 0], [r, sqrt(1 - r^2)]])."""
    p = {k: v.detach().numpy() for k, v in params.items()}
    x = data.numpy()
    K, d = model.num_components, model.dim
    total = stats.dirichlet.logpdf(p["weights"], np.full(K, model.concentration))
    total += stats.norm.logpdf(p["locs"], model.loc_mean.numpy(), model.loc_scale).sum()
    total += stats.halfcauchy.logpdf(p["scales"], scale=model.scale_scale).sum()
    log_comp = np.empty((x.shape[0], K))
    for k in range(K):
        if model.has_correlations:
            assert d == 2
            r = p["corr_cholesky"][k, 1, 0]
            eta = model.lkj_concentration
            total += stats.beta.logpdf((r + 1) / 2, eta, eta) - np.log(2)
            corr = np.array([[1.0, r], [r, 1.0]])
        else:
            corr = np.eye(d)
        cov = corr * np.outer(p["scales"][k], p["scales"][k])
        log_comp[:, k] = np.log(p["weights"][k]) + stats.multivariate_normal.logpdf(
            x, p["locs"][k], cov
        )
    return total + logsumexp(log_comp, axis=1).sum(), log_comp


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_sites_and_prior_predictive_shapes(covariance):
    model = BayesianGMM(3, 2, covariance)
    trace = poutine.trace(model).get_trace(None, num_points=7)
    shapes = {n: s["value"].shape for n, s in trace.nodes.items() if s["type"] == "sample"}
    assert shapes["weights"] == (3,)
    assert shapes["locs"] == shapes["scales"] == (3, 2)
    assert shapes["assignment"] == (7,)
    assert shapes["obs"] == (7, 2)
    assert ("corr_cholesky" in shapes) == (covariance == "full")
    # Vectorized prior predictive works (the gathers broadcast with a particle plate).
    draws = Predictive(model, num_samples=5, parallel=True)(None, num_points=7)
    assert draws["obs"].shape == (5, 7, 2)
    assert draws["assignment"].shape == (5, 7)


def test_one_dimensional_full_is_diag():
    model = BayesianGMM(2, 1, "full")
    assert not model.has_correlations
    assert model.global_sites == ("weights", "locs", "scales")


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_enumerated_log_joint_matches_scipy(covariance):
    """Pyro's enumeration of the assignments gives the scipy mixture log joint."""
    model = BayesianGMM(3, 2, covariance, concentration=1.7, loc_scale=3.0, lkj_concentration=1.5)
    data = _data()
    params = _prior_draw(model, seed=2)
    expected, _ = _scipy_log_joint(model, data, params)

    def empty_guide(data):
        pass

    conditioned = poutine.condition(model, data=params)
    loss = TraceEnum_ELBO(max_plate_nesting=1).loss(conditioned, empty_guide, data)
    assert -loss == pytest.approx(expected, rel=1e-10)
    assert model.log_joint(data, params).item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_responsibilities_are_bayes_rule(covariance):
    model = BayesianGMM(3, 2, covariance)
    data = _data()
    params = _prior_draw(model, seed=1)
    # Move the means onto the data so the responsibilities are not all 0/1.
    params["locs"] = torch.tensor([[-2.0, 0.0], [1.0, 0.5], [0.5, 1.5]], dtype=DTYPE)
    _, log_comp = _scipy_log_joint(model, data, params)
    by_hand = np.exp(log_comp - logsumexp(log_comp, axis=1, keepdims=True))
    resp = model.responsibilities(data, params)
    assert resp.shape == (30, 3)
    np.testing.assert_allclose(resp.numpy(), by_hand, rtol=1e-10, atol=1e-14)
    assert 0.05 < by_hand.max(1).min()  # not a trivial test


def test_batched_params():
    """joint_log_probs and log_joint broadcast over leading dims of the params."""
    model = BayesianGMM(3, 2)
    data = _data()
    draws = [_prior_draw(model, seed=s) for s in range(4)]
    stacked = {k: torch.stack([d[k] for d in draws]) for k in model.global_sites}
    assert model.joint_log_probs(data, stacked).shape == (4, 30, 3)
    batched = model.log_joint(data, stacked)
    single = torch.stack([model.log_joint(data, d) for d in draws])
    torch.testing.assert_close(batched, single)


def test_model_runs_under_trace_enum_elbo_with_data_dtype():
    model = BayesianGMM(2, 2)
    data = _data(10).float()
    trace = poutine.trace(model).get_trace(data)
    assert trace.nodes["locs"]["value"].dtype == torch.float32
    pyro.clear_param_store()


def test_argument_errors():
    with pytest.raises(ValueError, match="num_components"):
        BayesianGMM(0, 2)
    with pytest.raises(ValueError, match="dim"):
        BayesianGMM(2, 0)
    with pytest.raises(TypeError, match="num_components"):
        BayesianGMM(2.0, 2)
    with pytest.raises(ValueError, match="covariance"):
        BayesianGMM(2, 2, "spherical")
    with pytest.raises(ValueError, match="concentration"):
        BayesianGMM(2, 2, concentration=0.0)
    with pytest.raises(ValueError, match="loc_scale"):
        BayesianGMM(2, 2, loc_scale=-1.0)
    with pytest.raises(ValueError, match="scale_scale"):
        BayesianGMM(2, 2, scale_scale=float("inf"))
    with pytest.raises(ValueError, match="loc_mean"):
        BayesianGMM(2, 2, loc_mean=torch.zeros(3))
    model = BayesianGMM(2, 2)
    with pytest.raises(ValueError, match="data must have shape"):
        model(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="data must have shape"):
        model(torch.zeros(5))
    with pytest.raises(TypeError, match="data"):
        model(np.zeros((5, 2)))
    bad = torch.zeros(5, 2)
    bad[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN or inf .* row 3"):
        model(bad)
    with pytest.raises(ValueError, match="num_points"):
        model()
    with pytest.raises(ValueError, match="num_points"):
        model(torch.zeros(5, 2), num_points=4)
    with pytest.raises(ValueError, match="missing the site 'scales'"):
        model.log_joint(
            torch.zeros(5, 2), {"weights": torch.ones(2) / 2, "locs": torch.zeros(2, 2)}
        )
