"""fit_svi tells the user when the loss is still falling at the end of the run."""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer.autoguide import AutoNormal
from sklearn.exceptions import ConvergenceWarning

from inference import fit_svi
from inference.svi.loop import loss_drop
from pyro_cwm.guides import AutoCWM


def far_mean_model(y):
    loc = pyro.sample("loc", dist.Normal(0.0, 100.0))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("obs", dist.Normal(loc, 1.0), obs=y)


def correlated_model(x, y):
    alpha = pyro.sample("alpha", dist.Normal(0.0, 10.0))
    beta = pyro.sample("beta", dist.Normal(0.0, 10.0))
    sigma = pyro.sample("sigma", dist.HalfNormal(5.0))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("obs", dist.Normal(alpha + beta * x, sigma), obs=y)


def correlated_data(seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = 10 + torch.randn(100, generator=generator)
    return x, 1.0 + 0.5 * x + torch.randn(100, generator=generator)


def test_a_fit_stopped_far_from_the_optimum_warns_and_says_to_run_more_steps():
    # The mean lies 30 away; AutoNormal moves about 0.01 a step: 100 steps are far too few.
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    y = 30.0 + torch.randn(50)
    guide = AutoNormal(far_mean_model, init_scale=1e-3)
    with pytest.warns(ConvergenceWarning, match="not converged.*num_steps=200.*psis_diagnostic"):
        history = fit_svi(far_mean_model, guide, y, num_steps=100, progress=False)
    assert history["converged"] is False


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("guide_class", [AutoCWM, AutoNormal])
def test_a_converged_fit_does_not_warn(seed, guide_class):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    x, y = correlated_data(seed)
    guide = guide_class(correlated_model)
    steps = 500 if guide_class is AutoCWM else 3000
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        history = fit_svi(correlated_model, guide, x, y, num_steps=steps, progress=False)
    assert history["converged"] is True


def test_early_stopping_counts_as_converged_and_short_runs_are_not_judged():
    pyro.clear_param_store()
    y = torch.randn(20)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        guide = AutoCWM(far_mean_model, num_components=1)
        history = fit_svi(far_mean_model, guide, y, num_steps=5000, patience=50, progress=False)
        assert history["stopped_early"] and history["converged"] is True
        history = fit_svi(
            far_mean_model, AutoNormal(far_mean_model), y, num_steps=20, progress=False
        )
        assert history["converged"] is None


def test_loss_drop_measures_the_fall_over_the_tail_against_its_noise():
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(1000, generator=generator).tolist()
    fall, error = loss_drop(noise)
    # 20 medians of 10 draws (sd 0.39 each), a line through them: the fall over 100 steps
    assert abs(fall) < 3 * error and 0.1 < error < 0.3
    trend = [-0.01 * step + value for step, value in enumerate(noise)]
    fall, error = loss_drop(trend)
    assert fall == pytest.approx(0.01 * 100, abs=3 * error)
    spiky = [value + (1e4 if step % 37 == 0 else 0.0) for step, value in enumerate(trend)]
    assert loss_drop(spiky)[0] == pytest.approx(0.01 * 100, abs=3 * error)
    assert loss_drop(noise[:99]) is None
