"""A CWM site in a hand-written guide: the Rao-Blackwellized estimator outside AutoCWM."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import (
    SVI,
    Predictive,
    Trace_ELBO,
    TraceEnum_ELBO,
    TraceGraph_ELBO,
    config_enumerate,
)
from torch import nn

from inference import CWMELBO
from pyro_cwm import CWM, CWMEncoder
from pyro_cwm.guides import rao_blackwellize
from tests.helpers import random_cwm

F64 = torch.float64
NOISE = 0.3


def bimodal_model(x):
    """z_i ~ N(0, 1), x_i ~ N(z_i^2, 0.3^2): two modes of z_i for every x_i > 0."""
    zero, one = x.new_zeros(()), x.new_ones(())
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(zero, one).expand([1]).to_event(1))
        pyro.sample("x", dist.Normal(z.square(), NOISE).to_event(1), obs=x)


def amortized_guide(cwm):
    def guide(x):
        pyro.module("cwm", cwm)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", cwm(x))

    return guide


def quadrature_elbo(cwm, x):
    """The exact ELBO of ``bimodal_model`` with q(z_i | x_i) = cwm(x_i), by the trapezoid rule
    over z (independent of the sampling path: only the CWM's log_prob)."""
    grid = torch.linspace(-16.0, 16.0, 32001, dtype=F64)
    log_q = cwm(x).log_prob(grid[:, None, None])  # (G, N)
    prior = dist.Normal(torch.tensor(0.0, dtype=F64), 1.0)
    log_p = prior.log_prob(grid)[:, None] + dist.Normal(grid[:, None] ** 2, NOISE).log_prob(x[:, 0])
    return torch.trapezoid(log_q.exp() * (log_p - log_q), grid, dim=0).sum()


@pytest.fixture
def data():
    return torch.tensor([[1.2], [0.4], [2.0]], dtype=F64)


@pytest.mark.parametrize("path_gradient", [True, False])
def test_estimator_matches_the_exact_gradient(data, path_gradient):
    # Classifier and maps depend on z and x.
    cwm = random_cwm(1, 2, context_dim=1, seed=3, scale=0.3)
    params = list(cwm.parameters())
    exact = torch.autograd.grad(-quadrature_elbo(cwm, data), params)
    elbo = CWMELBO(
        num_particles=4000, path_gradient=path_gradient, classifier_warmup=0, max_plate_nesting=1
    )
    batches = []
    for _ in range(8):
        loss = elbo.differentiable_loss(bimodal_model, amortized_guide(cwm), data)
        batches.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    batches = torch.stack(batches)
    mean, se = batches.mean(0), batches.std(0) / batches.shape[0] ** 0.5
    exact = torch.cat([g.flatten() for g in exact])
    assert exact.abs().max() > 0.1  # a real gradient, not a flat start
    assert ((mean - exact).abs() <= 5 * se + 2e-3).all(), (mean - exact).abs().max()


def test_loss_is_the_exact_elbo_in_a_subsampled_plate():
    # Six identical points, two per step: the scaled estimate is 3x two points' ELBO.
    x = torch.full((6, 1), 1.1, dtype=F64)
    cwm = random_cwm(1, 3, context_dim=1, seed=1)

    def guide(x):
        pyro.module("cwm", cwm)
        with pyro.plate("data", 6, subsample_size=2) as index:
            pyro.sample("z", cwm(x[index]))

    def model(x):
        with pyro.plate("data", 6, subsample_size=2) as index:
            z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0).expand([1]).to_event(1))
            pyro.sample("x", dist.Normal(z.square(), NOISE).to_event(1), obs=x[index])

    exact = quadrature_elbo(cwm, x).item()
    elbo = CWMELBO(num_particles=20000, max_plate_nesting=1)
    estimates = torch.tensor([-elbo.loss(model, guide, x) for _ in range(4)])
    se = estimates.std() / 2
    assert estimates.mean().item() == pytest.approx(exact, abs=5 * se.item() + 1e-3)


@config_enumerate
def rich_model(x):
    """A global Normal site, a global vector site, a local site and an enumerated discrete
    local site, in a subsampled plate."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    with pyro.plate("data", x.shape[0], subsample_size=3) as index:
        c = pyro.sample("c", dist.Bernoulli(0.3))
        z = pyro.sample("z", dist.Normal(mu[..., None], 1.0).to_event(1))
        loc = z[..., 0].square() + c * w[..., 0]
        pyro.sample("x", dist.Normal(loc, 0.5 + w[..., 1].square()), obs=x[index, 0])


def rich_guide_parts():
    torch.manual_seed(0)
    encoder = random_cwm(1, 2, context_dim=1, seed=5, dtype=torch.float32)
    global_cwm = random_cwm(2, 3, seed=6, dtype=torch.float32)

    def guide(x):
        pyro.module("encoder", encoder)
        pyro.module("global_cwm", global_cwm)
        loc = pyro.param("mu_loc", torch.tensor(0.2))
        pyro.sample("mu", dist.Normal(loc, 0.7))
        pyro.sample("w", global_cwm())
        with pyro.plate("data", x.shape[0], subsample_size=3) as index:
            pyro.sample("z", encoder(x[index]))

    return guide, [encoder, global_cwm]


def loss_and_grads(loss_fn, model, guide, x, seed=0):
    pyro.set_rng_seed(seed)
    loss = loss_fn.differentiable_loss(model, guide, x)
    params = list(pyro.get_param_store().values())
    return loss, torch.autograd.grad(loss, params)


def test_cwmelbo_and_traceenum_elbo_agree_on_a_rich_guide():
    x = torch.linspace(-0.5, 2.5, 7)[:, None]
    guide, _ = rich_guide_parts()
    pyro.set_rng_seed(0)
    CWMELBO(max_plate_nesting=1).loss(rich_model, guide, x)
    ours_elbo = CWMELBO(num_particles=3, path_gradient=False, max_plate_nesting=1)
    ours = loss_and_grads(ours_elbo, rich_model, guide, x)
    pyro_s = loss_and_grads(
        TraceEnum_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1),
        rich_model,
        rao_blackwellize(guide),
        x,
    )
    assert torch.isfinite(ours[0])
    assert ours_elbo._direct is False  # two CWM sites and an enumerated model site
    assert ours[0].item() == pytest.approx(pyro_s[0].item(), rel=1e-5)
    for a, b in zip(ours[1], pyro_s[1]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    # The path gradient changes the gradient, not the value.
    path = loss_and_grads(CWMELBO(num_particles=3, max_plate_nesting=1), rich_model, guide, x)
    assert path[0].item() == pytest.approx(ours[0].item(), rel=1e-5)
    assert all(torch.isfinite(g).all() for g in path[1])


def test_one_cwm_site_skips_the_contraction_and_agrees_with_traceenum_elbo():
    # One CWM site and no enumerated model site: CWMELBO weights the factors in place.
    x = torch.linspace(-0.5, 2.5, 7)[:, None]
    encoder = random_cwm(1, 3, context_dim=1, seed=4, dtype=torch.float32)

    def model(x):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 7, subsample_size=3) as index:
            z = pyro.sample("z", dist.Normal(mu[..., None], 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z[..., 0].square(), 0.5), obs=x[index, 0])

    def guide(x):
        pyro.module("encoder", encoder)
        pyro.sample("mu", dist.Normal(pyro.param("mu_loc", torch.tensor(0.3)), 0.7))
        with pyro.plate("data", 7, subsample_size=3) as index:
            pyro.sample("z", encoder(x[index]))

    for path_gradient in (False, True):
        guide(x)  # fill the param store
        elbo = CWMELBO(num_particles=3, path_gradient=path_gradient, max_plate_nesting=1)
        ours = loss_and_grads(elbo, model, guide, x)
        assert elbo._direct is True
        reference = TraceEnum_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1)
        pyro_s = loss_and_grads(
            reference, model, rao_blackwellize(guide, path_gradient=path_gradient), x
        )
        assert ours[0].item() == pytest.approx(pyro_s[0].item(), rel=1e-5)
        for a, b in zip(ours[1], pyro_s[1]):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_rich_guide_trace_shapes():
    x = torch.linspace(-0.5, 2.5, 7)[:, None]
    guide, _ = rich_guide_parts()
    enumerated = pyro.poutine.enum(rao_blackwellize(guide), first_available_dim=-2)
    trace = pyro.poutine.trace(enumerated).get_trace(x)
    assert trace.nodes["w"]["value"].shape == (3, 1, 2)  # K images on dim -2
    assert trace.nodes["z"]["value"].shape == (2, 1, 3, 1)  # K images, a new enum dim
    assert trace.nodes["z_component"]["infer"]["enumerate"] == "parallel"
    plain = pyro.poutine.trace(guide).get_trace(x)
    assert plain.nodes["z"]["value"].shape == (3, 1)


def test_score_function_elbos_are_refused_with_the_fix():
    cwm = CWM(1, 2, context_dim=1)
    x = torch.tensor([[1.0], [2.0]])
    guide = amortized_guide(cwm)
    for elbo in (Trace_ELBO(), TraceGraph_ELBO()):
        with pytest.raises(ValueError, match="site 'z'.*\n.*CWMELBO.*rao_blackwellize"):
            elbo.loss(bimodal_model, guide, x)
    with pytest.raises(ValueError, match="rao_blackwellize"):
        TraceEnum_ELBO(max_plate_nesting=1).loss(bimodal_model, guide, x)
    with pytest.raises(TypeError, match="CWMELBO"):
        Trace_ELBO().loss(bimodal_model, rao_blackwellize(guide), x)


def test_predictive_and_trace_with_a_cwm_guide():
    cwm = CWM(1, 2, context_dim=1)
    x = torch.tensor([[1.0], [2.0], [0.5]])
    guide = amortized_guide(cwm)
    samples = Predictive(bimodal_model, guide=guide, num_samples=5)(x)
    assert samples["z"].shape == (5, 3, 1) and samples["x"].shape == (5, 3, 1)
    samples = Predictive(bimodal_model, guide=rao_blackwellize(guide), num_samples=4)(x)
    assert samples["z"].shape == (4, 3, 1)
    trace = pyro.poutine.trace(guide).get_trace(x)
    assert trace.nodes["z"]["fn"].batch_shape == (3,)


def test_classifier_is_held_during_warmup():
    cwm = random_cwm(1, 2, context_dim=1, seed=2, dtype=torch.float32)
    x = torch.tensor([[1.0], [2.0]])
    classifier = [p.detach().clone() for p in cwm.classifier.parameters()]
    maps = [p.detach().clone() for p in cwm.maps.parameters()]
    svi = SVI(
        bimodal_model,
        amortized_guide(cwm),
        pyro.optim.Adam({"lr": 0.01}),
        CWMELBO(classifier_warmup=3),
    )
    for _ in range(3):
        svi.step(x)
    assert all(torch.equal(a, b) for a, b in zip(classifier, cwm.classifier.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(maps, cwm.maps.parameters()))
    svi.step(x)
    assert not all(torch.equal(a, b) for a, b in zip(classifier, cwm.classifier.parameters()))


def test_bad_input_names_the_site():
    x = torch.tensor([[1.0], [2.0]])
    elbo = CWMELBO(max_plate_nesting=1)
    two_d = CWM(2, 2, context_dim=1)
    with pytest.raises(ValueError, match="site 'z'.*event shape \\(2,\\).*\\(1,\\)"):
        elbo.loss(bimodal_model, amortized_guide(two_d), x)
    nan = torch.tensor([[1.0], [float("nan")]])
    with pytest.raises(ValueError, match="site 'z'.*NaN"):
        elbo.loss(bimodal_model, amortized_guide(CWM(1, 2, context_dim=1)), nan)
    conditional = CWM(1, 2, context_dim=1)
    with pytest.raises(ValueError, match="context is required"):
        conditional()
    with pytest.raises(ValueError, match="context must have shape \\(..., 1\\)"):
        conditional(torch.ones(2, 3))

    def wrapped(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", conditional(x).to_event(0).mask(True))

    with pytest.raises(ValueError, match="site 'z'.*pyro.plate"):
        elbo.loss(bimodal_model, wrapped, x)


def test_encoder_state_dict_round_trip_and_errors():
    torch.manual_seed(0)
    encoder = CWMEncoder(nn.Sequential(nn.Linear(3, 8), nn.Softplus()), 8, dim=2)
    x = torch.randn(5, 3)
    z = torch.randn(5, 2)
    clone = CWMEncoder(nn.Sequential(nn.Linear(3, 8), nn.Softplus()), 8, dim=2)
    clone.load_state_dict(encoder.state_dict())
    assert torch.equal(clone(x).log_prob(z), encoder(x).log_prob(z))
    assert encoder(x).batch_shape == (5,) and encoder(x).event_shape == (2,)
    with pytest.raises(ValueError, match="feature_dim"):
        CWMEncoder(nn.Linear(3, 4), 8, dim=2)(x)


def test_cwm_starts_spread_over_the_reference():
    cwm = CWM(1, 2)
    loc, log_scale = cwm.maps.loc_log_scale()
    loc, scale = loc[:, 0], log_scale[:, 0].exp()
    assert loc[0] * loc[1] < 0 and (loc.abs() > 0.5).all()
    # The equally weighted start has the reference's first two moments.
    assert loc.mean().item() == pytest.approx(0.0, abs=0.1)
    assert (scale.square() + loc.square()).mean().item() == pytest.approx(1.0, abs=0.1)
