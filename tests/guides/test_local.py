"""AutoLocalNormal: local latents whose Normal guide follows the globals' draw."""

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Predictive, Trace_ELBO, TraceEnum_ELBO
from pyro.infer.autoguide import AutoGuideList, AutoNormal
from pyro.nn import PyroParam
from torch.distributions import constraints

from inference import CWMELBO, fit_svi
from pyro_cwm.data.zoo import HIER_SIGMA, HIER_TAU, hierarchical, hierarchical_posterior
from pyro_cwm.guides import AutoCWM, AutoLocalNormal

F64 = torch.float64


def vector_hierarchy(y, subsample_size=None):
    """mu ~ N(0, 10^2 I_2); theta_g ~ N(mu, I_2); y[g, :, c] ~ N(theta_g[c], 2^2): the zoo's
    hierarchy on two independent coordinates, each site a vector (event dim 1)."""
    zero = y.new_zeros(2)
    mu = pyro.sample("mu", dist.Normal(zero, 10.0).to_event(1))
    with pyro.plate("groups", y.shape[0], subsample_size=subsample_size) as index:
        theta = pyro.sample("theta", dist.Normal(mu, HIER_TAU).to_event(1))
        pyro.sample("y", dist.Normal(theta[..., None, :], HIER_SIGMA).to_event(2), obs=y[index])


def guide_list(model, given_cls=AutoNormal, **given_options):
    guide = AutoGuideList(model)
    given = given_cls(poutine.block(model, expose=["mu"]), **given_options)
    guide.append(given)
    guide.append(AutoLocalNormal(poutine.block(model, hide=["mu"]), given=given))
    return guide, given, guide[1]


def data(groups=20, n=5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    theta = 1.5 + torch.randn(groups, 1, 2, generator=generator, dtype=F64)
    return theta + HIER_SIGMA * torch.randn(groups, n, 2, generator=generator, dtype=F64)


def test_the_family_holds_the_exact_posterior_of_a_gaussian_hierarchy():
    y = data()
    guide, given, local = guide_list(vector_hierarchy)
    guide(y)
    n = y.shape[1]
    precision = 1 / HIER_TAU**2 + n / HIER_SIGMA**2
    weight = (1 / HIER_TAU**2) / precision  # d E[theta_g | mu, y] / d mu
    moments = [hierarchical_posterior(y[..., c]) for c in range(2)]
    given.locs.mu = PyroParam(torch.tensor([m[0] for m in moments], dtype=F64), event_dim=1)
    given.scales.mu = PyroParam(
        torch.tensor([m[1] for m in moments], dtype=F64), constraints.positive, 1
    )
    ybar = y.mean(1)
    center = local.globals_center
    local.locs.theta = PyroParam(weight * center + (1 - weight) * ybar, event_dim=1)
    local.scales.theta = PyroParam(torch.full_like(ybar, precision**-0.5), constraints.positive, 1)
    with torch.no_grad():
        local.loc_weights.theta.copy_(weight * torch.eye(2, dtype=F64))
    log_z = sum(m[2] for m in moments)
    elbo = Trace_ELBO(num_particles=16, vectorize_particles=True, max_plate_nesting=1)
    # q is the posterior: every particle's log p - log q is log Z.
    assert -elbo.loss(vector_hierarchy, guide, y) == pytest.approx(log_z, abs=1e-6)


def test_starts_as_autonormal_and_recentring_keeps_q():
    y = data(groups=6)
    pyro.set_rng_seed(0)
    guide, given, local = guide_list(vector_hierarchy)
    trace = poutine.trace(guide).get_trace(y)
    fn = trace.nodes["theta_unconstrained"]["fn"].base_dist
    torch.testing.assert_close(fn.loc, local.locs.theta.expand_as(fn.loc))
    torch.testing.assert_close(fn.scale, local.scales.theta)
    with torch.no_grad():
        local.loc_weights.theta.normal_()
        local.scale_weights.theta.normal_(std=0.3)
    globals_ = torch.randn(3, 2, dtype=F64)
    local._globals = globals_
    before = [t.clone() for t in local._get_loc_and_scale("theta")]
    local._recentre(local.globals_center + torch.tensor([0.7, -1.2], dtype=F64))
    after = local._get_loc_and_scale("theta")
    for old, new in zip(before, after):
        torch.testing.assert_close(new, old)
    assert before[0].shape == (3, 6, 2)  # the globals' batch on the left of the plate


@pytest.mark.parametrize("loss", ["cwmelbo", "traceenum"])
def test_follows_the_k_images_of_autocwm(loss):
    y = data(groups=8)
    pyro.set_rng_seed(1)
    guide, given, local = guide_list(vector_hierarchy, AutoCWM, num_components=3)
    elbo = (
        CWMELBO(max_plate_nesting=1) if loss == "cwmelbo" else TraceEnum_ELBO(max_plate_nesting=1)
    )
    value = elbo.loss(vector_hierarchy, guide, y, 4)
    assert torch.isfinite(torch.tensor(value))
    with torch.no_grad():
        local.loc_weights.theta.fill_(1.0)
    trace = poutine.trace(guide).get_trace(y, 4)
    mu, theta = trace.nodes["mu"]["value"], trace.nodes["theta"]["value"]
    assert theta.shape[-2:] == (4, 2) and mu.shape[-1] == 2
    draws = Predictive(vector_hierarchy, guide=guide, num_samples=5, return_sites=["theta"])(y, 4)
    assert draws["theta"].shape[-2:] == (4, 2)
    assert set(local.median(y, 4)) == {"theta"}
    assert local.quantiles([0.1, 0.9], y, 4)["theta"].shape[0] == 2


def test_bad_use_raises():
    with pytest.raises(TypeError, match="given"):
        AutoLocalNormal(hierarchical, given=lambda *args: None)
    given = AutoNormal(poutine.block(hierarchical, expose=["mu"]))
    local = AutoLocalNormal(poutine.block(hierarchical, hide=["mu"]), given=given)
    y = torch.randn(10, 5)
    with pytest.raises(RuntimeError, match="after the given guide"):
        local(y, 5)
    given(y, 5)
    local(y, 5)
    with pytest.raises(RuntimeError, match="after the given guide"):
        local(y, 5)  # the globals were drawn for the previous call


def test_subsampled_hierarchy_reaches_the_marginal_sd_of_the_global():
    # Mean field between mu and the thetas holds mu's sd at sqrt(1 / 2.25) = 0.67 of its
    # marginal here; following mu's draw, the local guide recovers the marginal.
    generator = torch.Generator().manual_seed(0)
    y = 1.5 + torch.randn(60, 1, generator=generator) + 2 * torch.randn(60, 5, generator=generator)
    mean, sd, _ = hierarchical_posterior(y)
    pyro.set_rng_seed(0)
    guide, given, local = guide_list(hierarchical)
    fit_svi(hierarchical, guide, y, 15, num_steps=1500, loss=Trace_ELBO(), progress=False)
    draws = Predictive(hierarchical, guide=guide, num_samples=4000, return_sites=["mu"])(y, 15)
    mu = draws["mu"]
    assert abs(mu.mean().item() - mean) < 0.3 * sd
    assert 0.85 < mu.std().item() / sd < 1.15


def _held_steps(elbo, guide, given, y, steps, move_until):
    """Run ``elbo.loss_and_grads`` at each step of ``steps`` (no optimizer), moving the CWM's
    locations by 0.02 per step before ``move_until``; the steps whose classifier was held."""
    locations = given.cwm.maps.params.value
    held = []
    for step in steps:
        if step < move_until:
            with torch.no_grad():
                locations[:, :1] += 0.02
        for param in guide.parameters():
            param.grad = None
        elbo.step = step
        elbo.loss_and_grads(hierarchical, guide, y)
        if all(p.grad is None for p in given.cwm.classifier.parameters()):
            held.append(step)
    return held


def test_the_classifier_of_a_travelling_autocwm_is_held_until_its_components_arrive():
    # In a guide list AutoCWM cannot climb its density: its components start at the init
    # point and travel. Released at the end of the warm-up, the first to arrive would take
    # all the weight and the others, without gradient, never come.
    y = data()[..., 0]
    pyro.set_rng_seed(0)
    guide, given, _ = guide_list(hierarchical, AutoCWM, num_components=3)
    guide(y)
    assert bool(given.travelling)
    elbo = CWMELBO(classifier_warmup=30)
    # Checks at steps 30, 50, 100, ...: 10 component sds of travel per check (init_scale
    # 0.1) until step 120, then none; at step 250 the move since step 150 is nil.
    held = _held_steps(elbo, guide, given, y, range(30, 320), move_until=120)
    assert held == list(range(30, 250))
    assert not bool(given.travelling)


def test_a_travelling_classifier_is_released_after_at_most_ten_warmups():
    y = data()[..., 0]
    pyro.set_rng_seed(0)
    guide, given, _ = guide_list(hierarchical, AutoCWM, num_components=3)
    guide(y)
    held = _held_steps(CWMELBO(classifier_warmup=3), guide, given, y, range(3, 60), 60)
    assert held == list(range(3, 50))  # the first check at or past 10 warm-ups (step 50)


def test_an_autocwm_that_climbs_its_density_does_not_travel():
    y = data()[..., 0]
    guide = AutoCWM(hierarchical, num_components=3)
    guide(y)
    assert not bool(guide.travelling)


def test_the_centre_follows_the_weighted_images_of_autocwm():
    # Components left far from the mass with no weight must not pull the centre: off the
    # mass, the weights a, b act through an offset that loc and scale also absorb, and
    # drift along it (the zoo's hierarchy: b to -0.4 and mu's sd ratio to 0.85).
    y = data()[..., 0]
    pyro.set_rng_seed(0)
    guide, given, local = guide_list(hierarchical, AutoCWM, num_components=3)
    guide(y)
    mass, away = 1.5, -20.0
    given.cwm.set_gaussian_mixture(
        torch.tensor([1.0, 1e-6, 1e-6]),
        torch.tensor([[mass], [away], [away]]),
        torch.full((3, 1), 0.1),
    )
    with torch.no_grad():
        local.globals_center.fill_(mass)
    elbo = CWMELBO(classifier_warmup=0)
    for _ in range(20):
        elbo.loss_and_grads(hierarchical, guide, y)
    # Unweighted, each step would move it 1% of the way to the images' mean (-12.8).
    assert local.globals_center.item() == pytest.approx(mass, abs=0.05)
