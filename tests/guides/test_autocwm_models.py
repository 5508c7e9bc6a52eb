"""AutoCWM on models written any way: ``X @ w``, ``torch.mv``, ``.dot``, Python loops over
the data, ``pyro.markov`` chains, tensors filled in place (issue 23).

Such models do not broadcast over the extra leading dimension that the K component images
(times particles, times starts) get in one batched call; AutoCWM checks the batched call
against single points, runs the model under ``torch.func.vmap`` or point by point instead,
and warns once.
"""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, TraceEnum_ELBO, config_enumerate
from pyro.infer.autoguide import AutoGuideList
from pyro.optim import Adam

from inference import CWMELBO, psis_diagnostic
from pyro_cwm.data.zoo import MIXTURE_PRIOR_SCALE, mixture_enum, mixture_log_joint
from pyro_cwm.guides import AutoCWM
from pyro_cwm.guides.log_joint import _vectorized, log_joint_route, unconstrained_log_joint

N, D, NOISE = 20, 3, 0.5
BROADCAST_WARNING = "does not broadcast over extra leading batch dimensions"


def regression_data(seed=0, n=N, d=D):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator)
    y = x @ torch.linspace(-1.0, 1.0, d) + NOISE * torch.randn(n, generator=generator)
    return x, y


def exact_regression_posterior(x, y):
    """w ~ N(0, I), y ~ N(X w, NOISE^2 I): the Gaussian posterior's mean and covariance."""
    precision = torch.eye(x.shape[1]) + x.T @ x / NOISE**2
    cov = torch.linalg.inv(precision)
    return cov @ x.T @ y / NOISE**2, cov


def prior(x):
    return pyro.sample("w", dist.Normal(torch.zeros(x.shape[1]), 1.0).to_event(1))


def regression_broadcasting(x, y):
    w = prior(x)
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.Normal((x * w).sum(-1), NOISE), obs=y)


def regression_matmul(x, y):
    w = prior(x)
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.Normal(x @ w, NOISE), obs=y)


def regression_mv(x, y):
    w = prior(x)
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.Normal(torch.mv(x, w), NOISE), obs=y)


def regression_dot_loop(x, y):
    w = prior(x)
    for i in range(len(x)):
        pyro.sample(f"y_{i}", dist.Normal(x[i].dot(w), NOISE), obs=y[i])


def regression_filled(x, y):
    # A tensor filled in place: neither batched nor under vmap; only point by point.
    w = prior(x)
    mean = torch.zeros(len(x))
    for i in range(len(x)):
        mean[i] = x[i] @ w
    with pyro.plate("data", len(x)):
        pyro.sample("y", dist.Normal(mean, NOISE), obs=y)


def fit(model, *args, num_components=2, steps=300, lr=0.02, **options):
    """AutoCWM fitted by CWMELBO; returns the guide and the warnings' messages."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoCWM(model, num_components=num_components, hidden_dims=(8,), **options)
    svi = SVI(model, guide, Adam({"lr": lr}), CWMELBO(classifier_warmup=50))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            svi.step(*args)
    return guide, [str(w.message) for w in caught if BROADCAST_WARNING in str(w.message)]


def posterior_mean(guide, num_samples=4000):
    with torch.no_grad():
        return guide.get_posterior().sample((num_samples,)).mean(0)


@pytest.mark.parametrize(
    "model, route",
    [
        (regression_matmul, "vmap"),
        (regression_mv, "vmap"),
        (regression_dot_loop, "vmap"),
        (regression_filled, "loop"),
    ],
)
def test_a_model_that_does_not_broadcast_fits_its_exact_posterior_and_warns_once(model, route):
    x, y = regression_data()
    mean, cov = exact_regression_posterior(x, y)
    options = {"num_starts": 4, "start_steps": 50} if route == "loop" else {}
    guide, messages = fit(model, x, y, **options)
    assert log_joint_route(guide) == route
    assert len(messages) == 1, messages
    assert "(X * w).sum(-1)" in messages[0] and "CWMELBO" in messages[0]
    error = (posterior_mean(guide) - mean) / cov.diagonal().sqrt()
    assert error.abs().max() < 0.2, error


def test_a_model_that_broadcasts_runs_batched_without_a_warning():
    x, y = regression_data()
    mean, cov = exact_regression_posterior(x, y)
    guide, messages = fit(regression_broadcasting, x, y)
    assert log_joint_route(guide) == "vectorized" and not messages
    error = (posterior_mean(guide) - mean) / cov.diagonal().sqrt()
    assert error.abs().max() < 0.2, error


def test_bayesian_logistic_regression_written_with_matmul_fits_as_the_broadcasting_one():
    x, _ = regression_data(seed=1, n=50)
    y = (x @ torch.tensor([1.5, -1.0, 0.5]) + 0.3 > 0).float()

    def written_with_matmul(x, y):
        w = prior(x)
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Bernoulli(logits=x @ w + b), obs=y)

    def broadcasting(x, y):
        w = prior(x)
        b = pyro.sample("b", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Bernoulli(logits=(x * w).sum(-1) + b), obs=y)

    matmul, messages = fit(written_with_matmul, x, y, num_components=4)
    reference, _ = fit(broadcasting, x, y, num_components=4)
    assert len(messages) == 1 and log_joint_route(matmul) == "vmap"
    assert torch.allclose(posterior_mean(matmul), posterior_mean(reference), atol=0.05)


T = 5
TRANSITION = torch.tensor([[0.9, 0.2], [-0.2, 0.9]])
STATE_NOISE, OBS_NOISE = 0.5, 0.4


def state_space(y):
    """x_0 ~ N(0, I), x_t ~ N(A x_{t-1}, q^2 I), y_t ~ N(x_t, r^2 I), written with A @ x."""
    x = torch.zeros(2)
    for t in pyro.markov(range(len(y))):
        loc = TRANSITION @ x if t else x
        scale = STATE_NOISE if t else 1.0
        x = pyro.sample(f"x_{t}", dist.Normal(loc, scale).to_event(1))
        pyro.sample(f"y_{t}", dist.Normal(x, OBS_NOISE).to_event(1), obs=y[t])


def state_space_log_joint(states, y):
    """The same density of the flat states (2 T,), in plain torch."""
    x = states.reshape(-1, 2)
    log_p = dist.Normal(0.0, 1.0).log_prob(x[0]).sum()
    log_p = log_p + dist.Normal(x[:-1] @ TRANSITION.T, STATE_NOISE).log_prob(x[1:]).sum()
    return log_p + dist.Normal(x, OBS_NOISE).log_prob(y).sum()


def test_a_markov_chain_written_with_matmul_fits_its_exact_posterior():
    y = torch.randn(T, 2, generator=torch.Generator().manual_seed(3))
    # The log joint is quadratic: one Newton step from zero gives the posterior exactly.
    zero = torch.zeros(2 * T)
    grad = torch.autograd.functional.jacobian(lambda s: state_space_log_joint(s, y), zero)
    hess = torch.autograd.functional.hessian(lambda s: state_space_log_joint(s, y), zero)
    cov = torch.linalg.inv(-hess)
    mean = cov @ grad
    guide, messages = fit(state_space, y, steps=400)
    assert log_joint_route(guide) == "vmap" and len(messages) == 1
    error = (posterior_mean(guide) - mean) / cov.diagonal().sqrt()
    assert error.abs().max() < 0.25, error


def test_a_silently_wrong_broadcast_is_caught():
    # Without plates, w at a batch of n points has shape (n, d); with n == d, x[i] @ w
    # runs and returns a vector of n log densities: the wrong ones.
    x, y = regression_data(d=4)

    def loop_matmul(x, y):
        w = prior(x)
        for i in range(len(x)):
            pyro.sample(f"y_{i}", dist.Normal(x[i] @ w, NOISE), obs=y[i])

    def loop_broadcasting(x, y):
        w = prior(x)
        for i in range(len(x)):
            pyro.sample(f"y_{i}", dist.Normal((x[i] * w).sum(-1), NOISE), obs=y[i])

    guide = AutoCWM(loop_broadcasting, num_components=2, start_steps=0, laplace=False)
    guide(x, y)
    u = torch.randn(4, 4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = unconstrained_log_joint(loop_matmul, guide, u, x, y)
    messages = [str(w.message) for w in caught if BROADCAST_WARNING in str(w.message)]
    assert len(messages) == 1 and "broadcasts wrongly" in messages[0]
    assert log_joint_route(guide, loop_matmul) == "vmap"
    assert log_joint_route(guide) == "vectorized"
    expected = unconstrained_log_joint(loop_broadcasting, guide, u, x, y)
    assert torch.allclose(got, expected, rtol=1e-5)
    # The batched call does run, and is wrong.
    assert not torch.allclose(_vectorized(loop_matmul, guide, u, (x, y), {}), expected)


def test_psis_runs_a_model_that_does_not_broadcast_as_cwmelbo_does():
    x, y = regression_data()
    guide, _ = fit(regression_matmul, x, y)
    cov = NOISE**2 * torch.eye(N) + x @ x.T
    exact = dist.MultivariateNormal(torch.zeros(N), cov).log_prob(y)
    result = psis_diagnostic(regression_matmul, guide, x, y, num_samples=2000)
    assert math.isfinite(result.k_hat) and result.k_hat < 0.7
    assert abs(result.log_z - exact) < 0.05


def test_a_model_that_fails_at_every_point_names_itself_and_the_site():
    x, y = regression_data()

    def broken(x, y):
        w = prior(x)
        with pyro.plate("data", len(x)):
            pyro.sample("y", dist.Normal(x[:, :2] @ w, NOISE), obs=y)

    with pytest.raises(RuntimeError, match=r"model '.*broken' raised RuntimeError .*'w'"):
        AutoCWM(broken)(x, y)


def test_cwmelbo_with_other_guides_says_why_a_model_that_does_not_broadcast_fails():
    x, y = regression_data()
    guide = AutoGuideList(regression_matmul)
    guide.append(AutoCWM(pyro.poutine.block(regression_matmul, expose=["w"])))
    for elbo in (CWMELBO(), TraceEnum_ELBO()):
        svi = SVI(regression_matmul, guide, Adam({"lr": 0.01}), elbo)
        with pytest.raises(TypeError, match="does not broadcast over them") as info:
            svi.step(x, y)
        assert "(X * w).sum(-1)" in str(info.value)


def test_trace_enum_elbo_with_a_model_that_does_not_broadcast_names_cwmelbo():
    x, y = regression_data()
    guide = AutoCWM(regression_matmul, num_components=2)
    svi = SVI(regression_matmul, guide, Adam({"lr": 0.01}), TraceEnum_ELBO())
    with pytest.warns(UserWarning, match=BROADCAST_WARNING):
        with pytest.raises(TypeError, match="CWMELBO"):
            svi.step(x, y)
    # The same guide trains with CWMELBO.
    svi = SVI(regression_matmul, guide, Adam({"lr": 0.01}), CWMELBO())
    assert math.isfinite(svi.step(x, y))


def test_an_enumerated_model_that_indexes_without_vindex_runs_point_by_point():
    # loc[z] indexes the batch dimension of a batched loc; Vindex(loc)[..., z] broadcasts.
    # Pyro's enumeration does not run under vmap: the model runs one point at a time.
    @config_enumerate
    def indexed(y):
        loc = pyro.sample("loc", dist.Normal(0.0, MIXTURE_PRIOR_SCALE).expand([2]).to_event(1))
        with pyro.plate("data", y.shape[0]):
            z = pyro.sample("z", dist.Categorical(torch.full((2,), 0.5)))
            pyro.sample("y", dist.Normal(loc[z], 1.0), obs=y)

    y = torch.cat([torch.randn(20) - 2, torch.randn(20) + 2])
    guide = AutoCWM(mixture_enum, num_components=2, start_steps=0, laplace=False)
    guide(y)
    u = 3 * torch.randn(6, 2)
    with pytest.warns(UserWarning, match=BROADCAST_WARNING):
        got = unconstrained_log_joint(indexed, guide, u, y)
    assert log_joint_route(guide, indexed) == "loop"
    assert torch.allclose(got, mixture_log_joint(u, y), rtol=1e-5)


def test_a_subsampled_plate_draws_the_same_rows_for_every_point_on_every_route():
    # One batched call draws the subsample once for all points; vmap and the loop do too.
    x, y = regression_data()

    def broadcasting(x, y):
        w = prior(x)
        with pyro.plate("data", len(x), subsample_size=5) as rows:
            pyro.sample("y", dist.Normal((x[rows] * w).sum(-1), NOISE), obs=y[rows])

    def matmul(x, y):
        w = prior(x)
        with pyro.plate("data", len(x), subsample_size=5) as rows:
            pyro.sample("y", dist.Normal(x[rows] @ w, NOISE), obs=y[rows])

    guide = AutoCWM(broadcasting, num_components=2, start_steps=0, laplace=False)
    guide(x, y)
    assert log_joint_route(guide) == "vectorized"  # no false alarm from the random rows
    u = torch.randn(3).expand(4, 3)  # one point, four times
    torch.manual_seed(1)
    expected = unconstrained_log_joint(broadcasting, guide, u, x, y)
    assert torch.allclose(expected, expected[0].expand(4))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*" + BROADCAST_WARNING)
        for route in ("vmap", "loop"):
            if route == "loop":
                vars(guide)["_log_joint_routes"][matmul] = "loop"
            torch.manual_seed(1)
            got = unconstrained_log_joint(matmul, guide, u, x, y)
            assert log_joint_route(guide, matmul) == route
            assert torch.allclose(got, expected, rtol=1e-5), route
