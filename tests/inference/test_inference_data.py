"""ArviZ conversion and PSIS diagnostics against exact evidence, ArviZ and direct computation."""

import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import MCMC, NUTS
from pyro.infer.autoguide import AutoNormal

from inference import CWMELBO, fit_svi, psis_diagnostic, to_inference_data
from pyro_cwm.data.posteriors import EIGHT_SCHOOLS_SIGMA as SIGMA
from pyro_cwm.data.posteriors import EIGHT_SCHOOLS_Y as Y
from pyro_cwm.data.posteriors import eight_schools
from pyro_cwm.data.zoo import mixture_enum
from pyro_cwm.guides import AutoCWM

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az


def conjugate(y):
    loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("obs", dist.Normal(loc, 1.0), obs=y)


@pytest.mark.parametrize("guide_class", [AutoNormal, AutoCWM])
def test_psis_log_evidence_matches_the_exact_evidence_and_k_matches_arviz(guide_class):
    y = torch.randn(20, generator=torch.Generator().manual_seed(0)) + 3.0
    guide = guide_class(conjugate)
    # With CWMELBO's path gradient AutoCWM is exact here to 1e-5 nats: its log weights
    # vary by 2e-4, and k-hat is the shape of that tail of near-constant weights (3.6
    # ours, 0.85 arviz's). The full gradient leaves weights that vary, as a real fit does.
    loss = CWMELBO(path_gradient=False) if guide_class is AutoCWM else None
    fit_svi(conjugate, guide, y, num_steps=800, progress=False, loss=loss)
    result = psis_diagnostic(conjugate, guide, y, num_samples=4000)
    exact = dist.MultivariateNormal(torch.zeros(20), torch.eye(20) + 100.0).log_prob(y).item()
    assert result.log_z == pytest.approx(exact, abs=0.02)
    assert result.elbo <= result.log_z + 1e-3
    _, k_arviz = az.psislw(result.log_weights.numpy().astype(np.float64))
    assert result.k_hat == pytest.approx(float(k_arviz), abs=0.05)
    assert result.k_hat < 0.7


def test_psis_sees_a_bad_guide():
    y = torch.randn(20) + 3.0
    guide = AutoNormal(conjugate, init_scale=0.01)
    guide(y)  # unfitted: located at the prior median with a tiny scale
    assert psis_diagnostic(conjugate, guide, y, num_samples=2000).k_hat > 0.7


@pytest.fixture(scope="module")
def fitted_eight_schools():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoCWM(eight_schools, num_components=2)
    fit_svi(eight_schools, guide, Y, SIGMA, num_steps=200, progress=False)
    return guide, to_inference_data(eight_schools, guide, Y, SIGMA, num_samples=400)


def test_inference_data_groups_and_shapes(fitted_eight_schools):
    _, data = fitted_eight_schools
    assert {"posterior", "posterior_predictive", "log_likelihood", "observed_data"} <= set(
        data.groups()
    )
    assert data.posterior["mu"].shape == (4, 100)  # scalar site: no trailing dimension
    assert data.posterior["theta"].shape == (4, 100, 8)
    assert (data.posterior["tau"] > 0).all()
    assert data.posterior_predictive["obs"].shape == (4, 100, 8)
    assert np.allclose(data.observed_data["obs"], Y.numpy())


def test_pointwise_log_likelihood_is_the_normal_density(fitted_eight_schools):
    _, data = fitted_eight_schools
    theta = torch.tensor(data.posterior["theta"].values)
    expected = dist.Normal(theta, SIGMA).log_prob(Y).numpy()
    assert np.allclose(data.log_likelihood["obs"].values, expected, atol=1e-5)


def test_summary_and_loo_run(fitted_eight_schools):
    _, data = fitted_eight_schools
    table = az.summary(data)
    assert {"mu", "tau", "theta[0]"} <= set(table.index)
    assert np.isfinite(table["r_hat"]).all()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loo = az.loo(data)
    assert np.isfinite(loo.elpd_loo)


def test_accepts_an_mcmc_run():
    y = torch.randn(10) + 1.0
    mcmc = MCMC(
        NUTS(conjugate), num_samples=50, warmup_steps=50, num_chains=1, disable_progbar=True
    )
    mcmc.run(y)
    data = to_inference_data(mcmc)
    assert data.posterior["loc"].shape == (1, 50)
    assert "log_likelihood" in data.groups()


def test_bad_arguments():
    with pytest.raises(ValueError, match="guide"):
        to_inference_data(conjugate, None, torch.zeros(3))
    with pytest.raises(ValueError, match="num_samples"):
        psis_diagnostic(conjugate, AutoNormal(conjugate), torch.zeros(3), num_samples=5)


two_means = mixture_enum  # loc (2,) outside every plate, an enumerated z per point


def test_an_enumerated_mixture_sums_its_assignments_out_of_the_log_likelihood():
    x = torch.tensor([-2.5, -2.0, 1.0, 2.0, 3.0])
    pyro.set_rng_seed(0)
    guide = AutoNormal(poutine.block(two_means, hide=["z"]))
    guide(x)
    data = to_inference_data(two_means, guide, x, num_samples=40)
    assert set(data.posterior.data_vars) == {"loc"}  # z is summed out, not a posterior draw
    locs = torch.as_tensor(data.posterior["loc"].values).reshape(-1, 2)
    log_lik = torch.as_tensor(data.log_likelihood["y"].values).reshape(-1, 5)
    # log p(x_i | locs) = log sum_k 1/2 N(x_i | locs_k, 1)
    exact = (dist.Normal(locs[:, None, :], 1.0).log_prob(x[:, None]) - np.log(2)).logsumexp(-1)
    assert torch.allclose(log_lik, exact, atol=1e-5)
