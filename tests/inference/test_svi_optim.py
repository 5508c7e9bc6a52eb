"""FusedClippedAdam: Pyro's ClippedAdam as one torch optimizer (fit_svi's default)."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoNormal

from inference import FusedClippedAdam


def make_params():
    pyro.clear_param_store()
    a = pyro.param("a", torch.tensor([1.0, -2.0, 3.0]))
    b = pyro.param("b", torch.tensor([[0.5, 0.1], [0.2, -0.3]]))
    return a.unconstrained(), b.unconstrained()


def run(optim, steps, params, only=None):
    for step in range(steps):
        a, b = params
        # Gradients of a few hundred on some elements: the clipping at 10 is active.
        loss = (50 * a**2).sum() + (b**3).sum() + step * a.sum()
        loss.backward()
        stepping = params if only is None else only
        optim(stepping)
        for p in params:
            p.grad = None


def test_the_trajectory_is_pyros_clipped_adam():
    params = make_params()
    run(pyro.optim.ClippedAdam({"lr": 0.05, "clip_norm": 10.0}), 50, params)
    expected = [p.detach().clone() for p in params]
    params = make_params()
    run(FusedClippedAdam(lr=0.05, clip_norm=10.0), 50, params)
    for got, want in zip(params, expected):
        # torch's Adam adds eps after the bias correction, Pyro's before: 1e-8 apart.
        assert torch.allclose(got, want, atol=1e-5)


def test_only_the_steps_parameters_move():
    a, b = params = make_params()
    optim = FusedClippedAdam(lr=0.1)
    run(optim, 3, params)
    before = b.detach().clone()
    run(optim, 3, params, only=[a])
    assert torch.equal(b, before)


def test_state_round_trips_and_resumes_the_same_trajectory():
    params = make_params()
    optim = FusedClippedAdam(lr=0.05)
    run(optim, 40, params)
    expected = [p.detach().clone() for p in params]
    params = make_params()
    first = FusedClippedAdam(lr=0.05)
    run(first, 20, params)
    state = first.get_state()
    assert set(state) == {"a", "b"} and int(state["a"]["state"][0]["step"]) == 20
    resumed = FusedClippedAdam(lr=0.05)
    resumed.set_state(state)

    def offset_run(optim, steps):  # the same losses as steps 20..39
        for step in range(20, 20 + steps):
            a, b = params
            ((50 * a**2).sum() + (b**3).sum() + step * a.sum()).backward()
            optim(params)
            for p in params:
                p.grad = None

    offset_run(resumed, 20)
    for got, want in zip(params, expected):
        assert torch.allclose(got, want, atol=1e-6)
    # Pyro's own optimizers load the same state.
    pyro.optim.ClippedAdam({"lr": 0.05}).set_state(state)


def test_it_trains_a_guide_in_pyros_svi_and_sets_its_step_size():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)

    def model(y):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("data", len(y)):
            pyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    y = torch.randn(50) + 3.0
    optim = FusedClippedAdam(lr=0.05)
    svi = SVI(model, AutoNormal(model), optim, Trace_ELBO())
    for _ in range(600):
        svi.step(y)
    exact = y.sum() / (len(y) + 0.01)  # conjugate posterior mean
    assert pyro.param("AutoNormal.locs.mu").item() == pytest.approx(exact.item(), abs=0.05)
    optim.set_lr(0.001)
    assert all(group["lr"] == 0.001 for group in optim.optimizer.param_groups)


@pytest.mark.parametrize("argument", ["lr", "clip_norm"])
def test_a_non_positive_setting_is_refused(argument):
    with pytest.raises(ValueError, match=argument):
        FusedClippedAdam(**{argument: 0.0})
