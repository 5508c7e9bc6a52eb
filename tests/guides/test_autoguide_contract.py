"""AutoCWM holds what Pyro's autoguides promise: shapes, point summaries, Predictive,
initialization, errors, modules, guide lists, serialization and an exact posterior.

Our own versions of the behaviours that Pyro's autoguide tests check (the whole of
Pyro's suite runs with ``python -m inference.bench.pyro_contract``), trained with
``TraceEnum_ELBO`` or ``CWMELBO``: AutoCWM refuses score-function ELBOs by design.
"""

import io
import math

import pyro
import pyro.distributions as dist
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import (
    SVI,
    JitTraceEnum_ELBO,
    Predictive,
    Trace_ELBO,
    TraceEnum_ELBO,
    config_enumerate,
)
from pyro.infer.autoguide import AutoGuideList, AutoNormal
from pyro.infer.autoguide.initialization import (
    init_to_feasible,
    init_to_mean,
    init_to_median,
    init_to_value,
)
from pyro.infer.reparam import ProjectedNormalReparam
from pyro.nn import PyroModule, PyroParam, PyroSample
from torch import nn
from torch.distributions import constraints

from inference import CWMELBO
from pyro_cwm.guides import AutoCWM
from pyro_cwm.guides.rao_blackwell import ImageDelta


def small_guide(model, **options):
    """A quick AutoCWM: two components, a short climb, location-scale maps."""
    settings = dict(num_components=2, hidden_dims=(8,), start_steps=20, map="location_scale")
    return AutoCWM(model, **{**settings, **options})


def adam(lr=0.01):
    return pyro.optim.Adam({"lr": lr})


def perturb(guide, seed=0, size=0.3):
    """Random parameters: the classifier's weights then depend on the reference draw."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in guide.cwm.parameters():
            p.add_(size * torch.randn_like(p))


# --- shapes -------------------------------------------------------------------------------


def layout_model():
    pyro.sample("scalar", dist.Normal(0.0, 1.0))
    pyro.sample("vector", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    with pyro.plate("rows", 2):
        pyro.sample("positive_in_plate", dist.Gamma(2.0, 1.0))
        pyro.sample("matrix_in_plate", dist.Normal(0.0, 1.0).expand([2, 2]).to_event(2))
    pyro.sample("correlation", dist.LKJCholesky(3, 2.0))
    pyro.sample("simplex", dist.Dirichlet(torch.full((4,), 2.0)))
    keep = torch.tensor([True, False, True])
    pyro.sample("masked", dist.Normal(0.0, 1.0).expand([3]).mask(keep).to_event(1))
    with pyro.plate("columns", 3, dim=-2):
        pyro.sample("in_outer_plate", dist.Beta(2.0, 2.0))


LAYOUT_SHAPES = {
    "scalar": (),
    "vector": (3,),
    "positive_in_plate": (2,),
    "matrix_in_plate": (2, 2, 2),
    "correlation": (3, 3),
    "simplex": (4,),
    "masked": (3,),
    "in_outer_plate": (3, 1),
}


@pytest.mark.parametrize(
    "elbo",
    [
        lambda: TraceEnum_ELBO(),
        lambda: TraceEnum_ELBO(num_particles=3, vectorize_particles=True),
        lambda: CWMELBO(num_particles=3),
    ],
    ids=["enum", "enum-particles", "cwmelbo"],
)
def test_layouts_of_sites_keep_their_shapes(elbo):
    # Matrix (LKJCholesky), simplex, masked and plated sites: the model-guide shape check
    # passes under enumeration (validation is on), and the draws have the model's shapes.
    guide = small_guide(layout_model)
    loss = elbo().loss(layout_model, guide)
    assert math.isfinite(loss)
    values = guide()
    assert {name: tuple(v.shape) for name, v in values.items()} == LAYOUT_SHAPES
    assert torch.allclose(values["simplex"].sum(), torch.tensor(1.0))
    lower = values["correlation"]
    assert torch.allclose((lower @ lower.T).diagonal(), torch.ones(3), atol=1e-5)


def test_image_delta_keeps_the_plate_batch_shape_and_broadcasts_over_images():
    images = torch.randn(4, 1, 3, 2)  # K=4 images, an empty plate dim, a plate of 3, event 2
    delta = ImageDelta(images, torch.zeros(4, 1, 3), event_dim=1)
    assert delta.batch_shape == (3,) and delta.event_shape == (2,)
    assert delta.log_prob(images).shape == (4, 1, 3)
    assert (delta.log_prob(images) == 0).all()
    wider = delta.expand([5, 3])
    assert wider.batch_shape == (5, 3) and wider.v.shape == (4, 5, 3, 2)


# --- median, quantiles and the Gaussian summary ---------------------------------------------


def three_supports():
    pyro.sample("x", dist.Normal(0.0, 1.0))
    pyro.sample("s", dist.LogNormal(0.0, 1.0))
    pyro.sample("p", dist.Beta(2.0, 2.0).expand([2]).to_event(1))


def test_median_and_quantiles_of_one_component_are_its_exact_marginals():
    guide = small_guide(three_supports, num_components=1, laplace=False)
    guide()
    loc, scale = torch.tensor([[0.5, -0.2, 1.0, -1.0]]), torch.tensor([[2.0, 0.5, 0.3, 0.8]])
    guide.cwm.set_gaussian_mixture(torch.ones(1), loc, scale)
    levels = [0.1, 0.5, 0.9]
    q = guide.quantiles(levels, num_samples=100_000)
    exact = dist.Normal(loc[0], scale[0]).icdf(torch.tensor(levels)[:, None])  # (3, 4)
    assert q["x"].shape == (3,) and q["s"].shape == (3,) and q["p"].shape == (3, 2)
    assert torch.allclose(q["x"], exact[:, 0], atol=0.03)
    assert torch.allclose(q["s"], exact[:, 1].exp(), rtol=0.02)
    assert torch.allclose(q["p"], torch.sigmoid(exact[:, 2:]), atol=0.01)
    median = guide.median(num_samples=100_000)
    for name in ("x", "s", "p"):
        assert not median[name].requires_grad and not q[name].requires_grad
        assert torch.equal(median[name], q[name][1])  # the same seeded draws
    assert torch.equal(guide.median(num_samples=100_000)["x"], median["x"])  # seeded
    mean, std = guide._loc_scale()
    assert torch.allclose(mean, loc[0], atol=0.03) and torch.allclose(std, scale[0], rtol=0.03)


def test_quantiles_of_a_mixture_match_the_guides_own_draws():
    guide = small_guide(three_supports, num_components=3, laplace=False)
    guide()
    perturb(guide, size=0.5)
    levels = torch.tensor([0.2, 0.5, 0.8])
    q = guide.quantiles(levels.tolist(), num_samples=40_000, seed=3)
    with torch.no_grad(), pyro.plate("draws", 40_000, dim=-2):
        draws = guide()
    for name in ("x", "s", "p"):
        empirical = torch.quantile(draws[name].reshape(40_000, -1), levels, dim=0)
        assert torch.allclose(empirical, q[name].reshape(3, -1), rtol=0.05, atol=0.03), name


def test_median_of_the_fitted_guide_is_the_posterior_median():
    def model():
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(x, 1.0), obs=torch.tensor(1.0))  # x | obs ~ N(1/2, 1/2)

    guide = small_guide(model)
    svi = SVI(model, guide, adam(), TraceEnum_ELBO(num_particles=8, vectorize_particles=True))
    for _ in range(30):
        svi.step()
    assert guide.median()["x"].item() == pytest.approx(0.5, abs=0.05)


# --- factors, Predictive ------------------------------------------------------------------


def test_pyro_factor_terms_enter_the_start_and_the_elbo():
    data = torch.tensor([0.5, 1.5, 2.5])

    def model():
        x = pyro.sample("x", dist.Normal(0.0, 1.0))
        with pyro.plate("data", 3):
            pyro.factor("fit", -0.5 * (x - data) ** 2)

    guide = small_guide(model, num_components=1, start_steps=50)
    guide()
    mean, std = guide._loc_scale()  # the Laplace start of a Gaussian is exact: N(9/8, 1/4)
    assert mean.item() == pytest.approx(data.sum().item() / 4, abs=0.02)
    assert std.item() == pytest.approx(0.5, rel=0.03)
    for elbo in (TraceEnum_ELBO(), CWMELBO(num_particles=4)):
        assert math.isfinite(elbo.loss(model, guide))


def regression(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("obs", dist.Normal((x * w).sum(-1), sigma), obs=y)


def test_predictive_draws_every_site_from_the_guide():
    torch.manual_seed(0)
    x = torch.randn(5, 2)
    y = x @ torch.tensor([1.0, -0.5]) + 0.1 * torch.randn(5)
    guide = small_guide(regression)
    svi = SVI(regression, guide, adam(), TraceEnum_ELBO())
    for _ in range(5):
        svi.step(x, y)
    samples = Predictive(regression, guide=guide, num_samples=7)(x)
    # As with Pyro's autoguides: global sites get a dimension for the model's plate.
    assert samples["w"].shape == (7, 1, 2)
    assert samples["sigma"].shape == (7, 1) and (samples["sigma"] > 0).all()
    assert samples["obs"].shape == (7, 5)
    latent = Predictive(regression, guide=guide, num_samples=7, return_sites=["w"])(x)
    assert set(latent) == {"w"}


def test_predictive_in_parallel():
    def model(data=None):
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        scale = pyro.sample("scale", dist.HalfNormal(1.0))
        with pyro.plate("data", 5):
            return pyro.sample("obs", dist.Normal(loc, scale), obs=data)

    guide = small_guide(model)
    guide(torch.randn(5))
    samples = Predictive(model, guide=guide, num_samples=7, parallel=True)()
    assert samples["loc"].shape == (7, 1) and samples["obs"].shape == (7, 5)


# --- initialization -------------------------------------------------------------------------


def init_model():
    pyro.sample("x", dist.Normal(1.5, 1.0))
    pyro.sample("s", dist.LogNormal(0.0, 0.5))


@pytest.mark.parametrize(
    "init_loc_fn, expected",
    [
        (init_to_feasible, {"x": 0.0, "s": 1.0}),
        (init_to_mean, {"x": 1.5, "s": math.exp(0.125)}),
        (
            init_to_value(values={"x": torch.tensor(0.3), "s": torch.tensor(2.0)}),
            {"x": 0.3, "s": 2.0},
        ),
        (init_to_median(num_samples=15), None),
    ],
    ids=["feasible", "mean", "value", "median"],
)
def test_the_start_begins_at_init_loc_fns_point(init_loc_fn, expected):
    # One component, one start, no climb: the component sits at init_loc_fn's point
    # (with a climb, that point is where the first start begins).
    guide = AutoCWM(
        init_model, num_components=1, num_starts=1, start_steps=0, laplace=False,
        init_loc_fn=init_loc_fn,
    )  # fmt: skip
    guide()
    start = guide._init_loc()
    if expected is not None:
        unconstrained = torch.tensor([expected["x"], math.log(expected["s"])])
        assert torch.allclose(start, unconstrained, atol=1e-6)
    with torch.no_grad():
        centre = guide.get_posterior().maps(torch.zeros(2))[0]
    assert torch.allclose(centre, start, atol=1e-6)
    median = guide.median()
    assert median["x"].item() == pytest.approx(start[0].item(), abs=0.01)
    assert median["s"].item() == pytest.approx(start[1].exp().item(), rel=0.01)


# --- errors ---------------------------------------------------------------------------------


def coin_model():
    p = pyro.sample("p", dist.Beta(2.0, 2.0))
    coin = pyro.sample("coin", dist.Bernoulli(p))
    pyro.sample("obs", dist.Normal(coin, 1.0), obs=torch.tensor(0.7))


def sphere_model():
    loc = pyro.sample("loc", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
    direction = pyro.sample("direction", dist.ProjectedNormal(loc))
    pyro.sample("obs", dist.Normal(direction, 1.0).to_event(1), obs=torch.tensor([0.0, 1, 0]))


def test_a_discrete_site_gets_an_error_naming_it_and_enumeration():
    with pytest.raises(ValueError, match=r"'coin'.*enumeration\.html.*hide=\['coin'\]"):
        small_guide(coin_model)()
    enumerated = config_enumerate(coin_model)
    guide = small_guide(enumerated)
    assert math.isfinite(TraceEnum_ELBO(max_plate_nesting=0).loss(enumerated, guide))


def test_a_spherical_site_gets_an_error_naming_projected_normal_reparam():
    with pytest.raises(ValueError, match=r"'direction'.*ProjectedNormalReparam"):
        small_guide(sphere_model)()
    model = poutine.reparam(sphere_model, config={"direction": ProjectedNormalReparam()})
    guide = small_guide(model)
    poutine.trace(guide).get_trace().compute_log_prob()
    assert math.isfinite(TraceEnum_ELBO().loss(model, guide))


def test_a_sequential_plate_gets_an_error_naming_the_site():
    def model():
        pyro.sample("x", dist.Normal(0.0, 1.0))
        for i in pyro.plate("steps", 2):
            pyro.sample(f"y_{i}", dist.Normal(0.0, 1.0))

    with pytest.raises(NotImplementedError, match=r"'y_0'.*sequential plate 'steps'"):
        small_guide(model)()


def test_score_function_elbos_stay_refused():
    guide = small_guide(three_supports)
    with pytest.raises(TypeError, match="CWMELBO"):
        Trace_ELBO().loss(three_supports, guide)


# --- PyroModule models, JIT -----------------------------------------------------------------


class Regression(PyroModule):
    def __init__(self):
        super().__init__()
        self.weight = PyroSample(dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        self.bias = PyroSample(dist.Normal(0.0, 5.0))
        self.noise = PyroParam(torch.tensor(0.5), constraint=constraints.positive)

    def forward(self, x, y=None):
        mean = (x * self.weight).sum(-1) + self.bias
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("obs", dist.Normal(mean, self.noise), obs=y)


def test_a_pyro_module_model_stays_outside_the_guide():
    torch.manual_seed(0)
    x = torch.randn(6, 2)
    y = x @ torch.tensor([2.0, -1.0]) + 0.5 + 0.1 * torch.randn(6)
    model = Regression()
    guide = small_guide(model)
    svi = SVI(model, guide, adam(0.02), TraceEnum_ELBO())
    losses = [svi.step(x, y) for _ in range(10)]
    assert all(math.isfinite(loss) for loss in losses)
    assert not any(module is model for module in guide.modules())
    assert "noise" in pyro.get_param_store()  # the model's own parameter is trained
    assert all(name.startswith("AutoCWM.cwm") for name in guide_params(guide))
    median = guide.median()
    assert set(median) == {"weight", "bias"} and median["weight"].shape == (2,)
    assert Predictive(model, guide=guide, num_samples=3)(x)["obs"].shape == (3, 6)


class RandomLinear(nn.Linear, PyroModule):
    """nn.Linear with random weights, as Pyro's own tests write a Bayesian layer."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features)
        self.weight = PyroSample(
            dist.Normal(0.0, 1.0).expand([out_features, in_features]).to_event(2)
        )
        self.bias = PyroSample(dist.Normal(0.0, 10.0).expand([out_features]).to_event(1))


class LinearRegression(PyroModule):
    def __init__(self, dim):
        super().__init__()
        self.linear = RandomLinear(dim, 1)

    def forward(self, x, y=None):
        mean = self.linear(x).squeeze(-1)  # F.linear: needs a 2-D weight, no batch
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("obs", dist.Normal(mean, 0.5), obs=y)


def test_an_nn_linear_model_trains_with_cwmelbo_and_trace_enum_names_it():
    torch.manual_seed(0)
    x = torch.randn(10, 3)
    y = x @ torch.tensor([1.0, -1.0, 0.5]) + 0.5 * torch.randn(10)
    model = LinearRegression(3)
    guide = small_guide(model)
    with pytest.warns(UserWarning, match="does not broadcast"):
        svi = SVI(model, guide, adam(0.02), CWMELBO())
        losses = [svi.step(x, y) for _ in range(200)]
    assert all(math.isfinite(loss) for loss in losses)
    # The exact posterior mean of the weight (bias prior N(0, 10^2), noise 0.5).
    design = torch.cat([x, torch.ones(10, 1)], -1)
    precision = torch.diag(torch.tensor([1.0, 1.0, 1.0, 0.01])) + design.T @ design / 0.25
    exact = torch.linalg.solve(precision, design.T @ y / 0.25)
    median = guide.median(x, y)
    assert torch.allclose(median["linear.weight"].reshape(3), exact[:3], atol=0.15)
    with pytest.raises(TypeError, match="CWMELBO"):
        SVI(model, guide, adam(), TraceEnum_ELBO()).step(x, y)


def test_a_dirichlet_expanded_over_the_data_fits_its_exact_posterior_under_cwmelbo():
    # Pyro's test_auto_dirichlet: Categorical(p).expand_by(data.shape) does not broadcast
    # over the images, so the model runs point by point.
    prior = torch.tensor([0.5, 1.0, 1.5, 3.0])
    data = torch.tensor([0] * 4 + [1] * 2 + [2] * 5)

    def model(data):
        p = pyro.sample("p", dist.Dirichlet(prior))
        with pyro.plate("data_plate"):
            pyro.sample("data", dist.Categorical(p).expand_by(data.shape), obs=data)

    pyro.set_rng_seed(0)
    guide = small_guide(model)
    with pytest.warns(UserWarning, match="does not broadcast"):
        svi = SVI(model, guide, adam(0.02), CWMELBO(num_particles=4))
        for _ in range(300):
            svi.step(data)
    posterior = dist.Dirichlet(prior + torch.bincount(data, minlength=4))
    draws = Predictive(model, guide=guide, num_samples=4000)(data)["p"]
    assert torch.allclose(draws.mean(0), posterior.mean, atol=0.03)
    assert torch.allclose(draws.std(0), posterior.variance.sqrt(), rtol=0.25)


def guide_params(guide):
    with poutine.trace(param_only=True) as trace:
        guide.get_posterior()
    return list(trace.trace.nodes)


def test_jit_elbo_trains_the_guide():
    # Each parameter is registered once: JIT ELBOs take them as inputs by name.
    guide = small_guide(three_supports)
    guide()
    names = guide_params(guide)
    assert len({id(pyro.param(name)) for name in names}) == len(names)
    options = dict(num_particles=20, vectorize_particles=True, ignore_jit_warnings=True)
    svi = SVI(three_supports, guide, adam(), JitTraceEnum_ELBO(**options))
    before = [p.detach().clone() for p in guide.cwm.parameters()]
    assert all(math.isfinite(svi.step()) for _ in range(3))
    assert any(not torch.equal(a, p) for a, p in zip(before, guide.cwm.parameters()))
    # The compiled objective is the plain one: the same ELBO, up to Monte Carlo error.
    options["num_particles"] = 4000
    jit = JitTraceEnum_ELBO(**options).loss(three_supports, guide)
    plain = TraceEnum_ELBO(num_particles=4000, vectorize_particles=True).loss(three_supports, guide)
    assert jit == pytest.approx(plain, abs=0.05)


# --- replay, guide lists --------------------------------------------------------------------


def replay_model():
    a = pyro.sample("a", dist.Normal(0.0, 1.0))
    b = pyro.sample("b", dist.Normal(a.unsqueeze(-1), torch.ones(2)).to_event(1))
    with pyro.plate("groups", 4):
        c = pyro.sample("c", dist.Dirichlet(b.exp()))
        pyro.sample("obs", dist.Categorical(c), obs=torch.tensor([0, 1, 1, 0]))
    return a, b, c


@pytest.mark.parametrize("sample_shape", [(), (6,), (5, 4)], ids=str)
def test_replaying_the_guide_under_particle_plates(sample_shape):
    guide = small_guide(replay_model)
    with pyro.plate_stack("particles", sample_shape, rightmost_dim=-2):
        guide_trace = poutine.trace(guide).get_trace()
        a, b, c = poutine.replay(replay_model, guide_trace)()
    lead = sample_shape + (1,) if sample_shape else ()
    assert a.shape == lead and b.shape == lead + (2,)
    assert c.shape == sample_shape + (4, 2)


def pair_model():
    pyro.sample("x", dist.Normal(0.0, 1.0))
    pyro.sample("y", dist.MultivariateNormal(torch.zeros(3), torch.eye(3)))


@pytest.mark.parametrize("returns_dict", [False, True])
def test_callable_guides_beside_autocwm_in_a_guide_list(returns_dict):
    def guide_x():
        loc = pyro.param("x_loc", torch.tensor(0.2))
        x = pyro.sample("x", dist.Delta(loc))
        return {"x": x} if returns_dict else None

    guide = AutoGuideList(pair_model)
    guide.append(guide_x)
    guide.append(small_guide(poutine.block(pair_model, expose=["y"])))
    assert set(guide()) == ({"x", "y"} if returns_dict else {"y"})
    assert math.isfinite(TraceEnum_ELBO().loss(pair_model, guide))


def test_autocwm_as_a_member_of_a_guide_list():
    guide = AutoGuideList(pair_model)
    guide.append(AutoNormal(poutine.block(pair_model, expose=["x"])))
    guide.append(small_guide(poutine.block(pair_model, hide=["x"])))
    for elbo in (TraceEnum_ELBO(), CWMELBO(num_particles=2)):
        svi = SVI(pair_model, guide, adam(), elbo)
        assert all(math.isfinite(svi.step()) for _ in range(2))
    part = guide[1]
    assert part.master() is guide and part._pyro_name == "AutoGuideList.1"
    assert set(guide.median()) == {"x", "y"}
    q = guide.quantiles([0.25, 0.75])
    assert q["y"].shape == (2, 3) and (q["y"][0] < q["y"][1]).all()


def test_create_plates_is_accepted_and_local_sites_point_to_a_guide_list():
    def model(data, subsample):
        drift = pyro.sample("drift", dist.LogNormal(-1.0, 0.5))
        with pyro.plate("data", len(data), subsample=subsample) as index:
            state = pyro.sample("state", dist.Normal(0.0, drift))
            pyro.sample("obs", dist.Normal(state, 1.0), obs=data[index])

    def create_plates(data, subsample):
        return pyro.plate("data", len(data), subsample=subsample)

    data, subsample = torch.randn(20), torch.arange(5, 10)
    with pytest.raises(ValueError, match=r"'state'.*subsampled plate 'data'.*AutoGuideList"):
        small_guide(model, create_plates=create_plates)(data, subsample)
    guide = AutoGuideList(model, create_plates=create_plates)
    guide.append(small_guide(poutine.block(model, expose=["drift"])))
    guide.append(AutoNormal(poutine.block(model, hide=["drift"])))
    svi = SVI(model, guide, adam(), TraceEnum_ELBO())
    assert math.isfinite(svi.step(data, subsample))
    trace = poutine.trace(guide).get_trace(data, subsample)
    assert torch.equal(trace.nodes["data"]["value"], subsample)


# --- serialization --------------------------------------------------------------------------


def test_torch_save_and_load_of_a_guide_on_a_local_model():
    data = torch.tensor([0.3, -0.4, 1.2])

    def model(data):  # a local function cannot be pickled: the guide drops its model
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        scale = pyro.sample("scale", dist.HalfNormal(1.0))
        with pyro.plate("data", len(data)):
            pyro.sample("obs", dist.Normal(loc, scale), obs=data)

    guide = small_guide(model)
    guide(data)
    perturb(guide)
    pyro.set_rng_seed(1)
    expected = guide.call(data)
    buffer = io.BytesIO()
    torch.save(guide, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    actual = loaded.call(data)
    assert all(torch.equal(a, e) for a, e in zip(actual, expected, strict=True))
    assert loaded.median()["loc"] == guide.median()["loc"]
    assert guide(data)["scale"] > 0  # the original guide still runs


def test_state_dict_round_trip_through_a_weights_only_file(tmp_path):
    guide = small_guide(three_supports)
    guide()
    perturb(guide)
    torch.save(guide.state_dict(), tmp_path / "guide.pt")
    fresh = small_guide(three_supports)
    fresh()
    fresh.load_state_dict(torch.load(tmp_path / "guide.pt", weights_only=True))
    draws = []
    for g in (guide, fresh):
        pyro.set_rng_seed(2)
        draws.append(g())
    assert all(torch.equal(draws[0][name], draws[1][name]) for name in draws[0])


# --- an exact posterior ---------------------------------------------------------------------


def gaussian_chain(data):
    x1 = pyro.sample("x1", dist.Normal(0.0, 1.0))
    x2 = pyro.sample("x2", dist.Normal(x1, 1.0))
    x3 = pyro.sample("x3", dist.Normal(x2, 1.0))
    with pyro.plate("data", len(data)):
        pyro.sample("obs", dist.Normal(x3, 1.0), obs=data)


def chain_posterior(data):
    """Mean and covariance of (x1, x2, x3) given the data, in closed form."""
    precision = torch.tensor([[2.0, -1.0, 0.0], [-1.0, 2.0, -1.0], [0.0, -1.0, 1.0]])
    precision[2, 2] += len(data)
    covariance = torch.linalg.inv(precision)
    return covariance @ torch.tensor([0.0, 0.0, data.sum().item()]), covariance


@pytest.mark.parametrize(
    "options",
    [{}, {"laplace": False, "map": "affine", "num_components": 1}],
    ids=["laplace-start", "affine-from-init-scale"],
)
def test_exact_posterior_of_a_conjugate_gaussian_chain_under_cwmelbo(options):
    data = torch.tensor([1.0, 2.0, 0.5, 1.5])
    mean, covariance = chain_posterior(data)
    guide = small_guide(gaussian_chain, **options)
    svi = SVI(gaussian_chain, guide, adam(0.02), CWMELBO(num_particles=8, classifier_warmup=0))
    for _ in range(500 if options else 100):
        svi.step(data)
    torch.manual_seed(4)
    with torch.no_grad():
        draws = guide.get_posterior().sample((40_000,))  # all sites real: u = (x1, x2, x3)
    sd = covariance.diagonal().sqrt()
    assert torch.allclose(draws.mean(0), mean, atol=0.05 * sd.min().item())
    assert torch.allclose(draws.var(0), covariance.diagonal(), rtol=0.07)
    correlation = torch.corrcoef(draws.T)
    expected = covariance / (sd[:, None] * sd)
    assert torch.allclose(correlation, expected, atol=0.03)
