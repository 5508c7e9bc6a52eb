"""The CWM distribution against independent references: quadrature, torch's mixtures, scipy."""

import math

import numpy as np
import pytest
import torch
import zuko
from scipy import integrate, stats
from torch.distributions import (
    Categorical,
    Independent,
    MixtureSameFamily,
    MultivariateNormal,
    Normal,
)

from pyro_cwm import CWM, ClassifierWeightedMixture
from pyro_cwm.nn import ConstantWeights, build_maps, map_arguments
from pyro_cwm.nn.maps import PreconditionedMaps
from tests.helpers import (
    MAP_KINDS,
    binned_goodness_of_fit,
    composite_gauss_legendre,
    map_kwargs,
    random_cwm,
)

GOF_THRESHOLD = 1e-3  # spurious failure rate of a good sampler


@pytest.mark.parametrize("map", MAP_KINDS)
def test_density_integrates_to_one_1d(map):
    dist = random_cwm(1, 3, map)()
    if map != "flow":
        value, _ = integrate.quad(
            lambda x: dist.log_prob(torch.tensor([[x]], dtype=torch.float64)).exp().item(),
            -np.inf,
            np.inf,
            limit=200,
        )
        assert value == pytest.approx(1.0, abs=1e-7)
    # Gauss-Legendre on a wide interval (vectorized; the spline's kinks slow quad down).
    nodes, weights = composite_gauss_legendre(-40.0, 40.0)
    with torch.no_grad():
        density = dist.log_prob(torch.tensor(nodes)[:, None]).exp()
    total = (torch.tensor(weights) * density).sum().item()
    assert total == pytest.approx(1.0, abs=1e-4 if map == "flow" else 1e-7)


@pytest.mark.parametrize("map", MAP_KINDS)
def test_density_integrates_to_one_2d(map):
    dist = random_cwm(2, 3, map)()
    # Gauss-Legendre tensor product on a box holding all but a negligible part of the mass.
    # Splines are only C^1 at their knots, so the flow's quadrature converges more slowly.
    panels, tolerance = (30, 1e-3) if map == "flow" else (15, 1e-5)
    if map == "iaf":  # random affine transforms: sharper features
        panels = 40
    nodes, weights = composite_gauss_legendre(-14.0, 14.0, panels=panels, nodes=20)
    x, w = torch.tensor(nodes), torch.tensor(weights)
    n = len(nodes)
    grid = torch.cartesian_prod(x, x)
    with torch.no_grad():
        density = dist.log_prob(grid).exp().reshape(n, n)
    total = (w[:, None] * w[None, :] * density).sum().item()
    assert total == pytest.approx(1.0, abs=tolerance)


@pytest.mark.parametrize("map", MAP_KINDS)
def test_conditional_density_integrates_to_one_for_each_context(map):
    context = torch.linspace(-1, 1, 8, dtype=torch.float64).reshape(4, 2)
    dist = random_cwm(1, 3, map, context_dim=2, scale=0.2)(context)
    nodes, weights = composite_gauss_legendre(-40.0, 40.0)
    x = torch.tensor(nodes)[:, None, None]  # (G, 1, 1) broadcasts against batch (4,)
    with torch.no_grad():
        density = dist.log_prob(x).exp()  # (G, 4)
    totals = (torch.tensor(weights)[:, None] * density).sum(0)
    assert totals.shape == (4,)
    tolerance = 1e-3 if map == "flow" else 1e-6
    assert torch.allclose(totals, torch.ones(4, dtype=torch.float64), atol=tolerance)


@pytest.mark.parametrize("map", MAP_KINDS)
def test_constant_classifier_is_the_diagonal_gaussian_mixture(map):
    torch.manual_seed(1)
    K, d = 4, 3
    weights = torch.rand(K, dtype=torch.float64) + 0.1
    weights /= weights.sum()
    loc = torch.randn(K, d, dtype=torch.float64)
    scale = torch.rand(K, d, dtype=torch.float64) + 0.2
    cwm = CWM(d, K, **map_kwargs(map)).double()
    cwm.set_gaussian_mixture(weights, loc, scale)
    gmm = MixtureSameFamily(Categorical(weights), Independent(Normal(loc, scale), 1))
    x = 2 * torch.randn(50, d, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(cwm().log_prob(x), gmm.log_prob(x), atol=1e-10)
        # Responsibilities from scipy, computed independently.
        joint = np.stack(
            [
                np.log(weights[k].item())
                + stats.multivariate_normal(loc[k].numpy(), np.diag(scale[k].numpy() ** 2)).logpdf(
                    x
                )
                for k in range(K)
            ],
            -1,
        )
        expected = joint - np.logaddexp.reduce(joint, -1, keepdims=True)
        assert np.allclose(cwm().component_log_probs(x).numpy(), expected, atol=1e-10)


def test_affine_maps_with_constant_weights_is_the_full_covariance_mixture():
    torch.manual_seed(2)
    K, d = 3, 3
    maps = build_maps("affine", d, K).double()
    with torch.no_grad():
        for p in maps.parameters():
            p.normal_(0, 0.5)
    classifier = ConstantWeights(K, torch.tensor([0.3, -0.2, 0.5])).double()
    reference = Independent(Normal(torch.zeros(d, dtype=torch.float64), 1.0), 1)
    dist = ClassifierWeightedMixture(reference, maps, classifier)
    loc, _, scale_tril = maps.loc_log_diag_tril()
    gmm = MixtureSameFamily(
        Categorical(logits=classifier.logits), MultivariateNormal(loc, scale_tril=scale_tril)
    )
    x = torch.randn(40, d, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(dist.log_prob(x), gmm.log_prob(x), atol=1e-10)


def test_affine_maps_stay_invertible_when_widths_differ_by_ten_thousand():
    # Widths 1e-4 and 1 (an AutoCWM component in a badly scaled posterior) and off-diagonal
    # parameters of 0.1, a few Adam steps: the correlation part is relative to each row's
    # width, so T_k stays well-conditioned and its inverse exact (free entries of L_k gave
    # a condition number of 1e14 and a round-trip error of 5e3 on gp_pois_regr).
    K, d = 2, 13
    maps = build_maps("affine", d, K).double()
    widths = torch.tensor([1e-4, 1.0], dtype=torch.float64).repeat(7)[:d].expand(K, d)
    maps.set_location_scale(torch.zeros(K, d, dtype=torch.float64), widths.clone())
    with torch.no_grad():
        next(p for p in maps.parameters() if p.numel() > 2 * K * d)[..., 2 * d :] = 0.1
    loc, log_diag, scale_tril = maps.loc_log_diag_tril()
    assert torch.linalg.cond(scale_tril).max() < 1e6
    z = torch.randn(50, d, dtype=torch.float64)
    with torch.no_grad():
        x = maps(z)  # (50, K, d)
        back, log_det = maps.inverse(x[:, 0])
    assert torch.allclose(back[:, 0], z, atol=1e-9)
    assert torch.allclose(log_det[:, 0], -torch.linalg.slogdet(scale_tril[0])[1], atol=1e-9)


@pytest.mark.parametrize("map", MAP_KINDS)
@pytest.mark.parametrize("dim", [1, 2])
def test_samples_agree_with_log_prob(map, dim):
    dist = random_cwm(dim, 3, map, seed=3)()
    torch.manual_seed(4)
    samples = dist.sample((4000,))
    assert binned_goodness_of_fit(dist, samples) > GOF_THRESHOLD


def test_goodness_of_fit_rejects_a_wrong_sampler():
    # Negative control: the test above can fail.
    dist = random_cwm(2, 3, seed=3)()
    other = random_cwm(2, 3, seed=5)()
    torch.manual_seed(4)
    samples = other.sample((4000,))
    assert binned_goodness_of_fit(dist, samples) < GOF_THRESHOLD


@pytest.mark.parametrize("map", MAP_KINDS)
def test_conditional_samples_agree_with_log_prob(map):
    # A milder perturbation: random context networks can give thin, spiky components
    # whose cell masses the quadrature would miss.
    cwm = random_cwm(2, 3, map, context_dim=2, seed=6, scale=0.25)
    context = torch.tensor([0.5, -1.0], dtype=torch.float64).expand(4000, 2)
    dist = cwm(context)
    torch.manual_seed(7)
    samples = dist.sample()
    assert samples.shape == (4000, 2)
    assert binned_goodness_of_fit(cwm(context[:1]), samples) > GOF_THRESHOLD


@pytest.mark.parametrize("map", MAP_KINDS)
@pytest.mark.parametrize("context_dim", [0, 2])
def test_component_log_probs_normalize(map, context_dim):
    cwm = random_cwm(2, 4, map, context_dim=context_dim)
    context = torch.randn(6, context_dim, dtype=torch.float64) if context_dim else None
    dist = cwm(context)
    x = torch.randn(5, 6, 2, dtype=torch.float64)
    with torch.no_grad():
        log_v = dist.component_log_probs(x)
        assert log_v.shape == (5, 6, 4)
        assert torch.allclose(
            log_v.logsumexp(-1), torch.zeros(5, 6, dtype=torch.float64), atol=1e-12
        )
        # Bayes' rule by hand: v_k = joint_k / sum_j joint_j, the sum being the density.
        joint = dist.joint_log_probs(x)
        assert torch.allclose(log_v, joint - dist.log_prob(x)[..., None], atol=1e-12)


@pytest.mark.parametrize("map", MAP_KINDS)
@pytest.mark.parametrize("context_dim", [0, 2])
def test_gradients_reach_every_parameter(map, context_dim):
    cwm = random_cwm(2, 3, map, context_dim=context_dim)
    context = torch.randn(8, context_dim, dtype=torch.float64) if context_dim else None
    x = torch.randn(8, 2, dtype=torch.float64)
    loss = -cwm(context).log_prob(x).mean()
    loss.backward()
    for name, p in cwm.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # The Rao-Blackwellized path: a w_k(z)-weighted function of T_k(z) reaches them too.
    cwm.zero_grad()
    images, log_w = cwm(context).rsample_components((5,))
    assert images.shape == ((5, 8, 3, 2) if context_dim else (5, 3, 2))
    (log_w.exp() * images.sin().sum(-1)).sum().backward()
    for name, p in cwm.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_batch_shapes_broadcast_like_torch_distributions():
    cwm = random_cwm(2, 3, context_dim=1)
    dist = cwm(torch.randn(4, 1, dtype=torch.float64))
    assert dist.batch_shape == (4,) and dist.event_shape == (2,)
    assert dist.log_prob(torch.randn(2, dtype=torch.float64)).shape == (4,)
    assert dist.log_prob(torch.randn(5, 1, 2, dtype=torch.float64)).shape == (5, 4)
    assert dist.sample((7,)).shape == (7, 4, 2)
    expanded = dist.expand((3, 4))
    assert expanded.batch_shape == (3, 4) and expanded.sample().shape == (3, 4, 2)
    x = torch.randn(4, 2, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(expanded.log_prob(x), dist.log_prob(x).expand(3, 4))

    plain = random_cwm(2, 3)()
    assert plain.batch_shape == ()
    wide = plain.expand((5,))
    assert wide.log_prob(torch.randn(2, dtype=torch.float64)).shape == (5,)
    assert wide.sample((2,)).shape == (2, 5, 2)
    assert plain.log_prob(torch.randn(3, 6, 2, dtype=torch.float64)).shape == (3, 6)


def test_follows_the_module_dtype():
    cwm = CWM(2, 3)
    assert cwm().sample((4,)).dtype == torch.float32
    assert cwm.double()().sample((4,)).dtype == torch.float64


@pytest.mark.cuda
@pytest.mark.parametrize("map", MAP_KINDS)
def test_runs_on_cuda(map):
    cwm = random_cwm(2, 3, map, dtype=torch.float32).cuda()
    x = cwm().sample((100,))
    assert x.is_cuda and cwm().log_prob(x).is_cuda


class TestBadInput:
    def test_nan_and_inf_values(self):
        dist = CWM(2, 3)()
        for bad in (float("nan"), float("inf")):
            with pytest.raises(ValueError, match="value"):
                dist.log_prob(torch.tensor([[0.0, bad]]))

    def test_wrong_event_dim(self):
        with pytest.raises(ValueError):
            CWM(2, 3)().log_prob(torch.zeros(4, 3))

    @pytest.mark.parametrize("k", [0, -1])
    def test_num_components_below_one(self, k):
        with pytest.raises(ValueError, match="num_components"):
            CWM(2, k)

    def test_non_integer_dim(self):
        with pytest.raises(TypeError, match="dim"):
            CWM(2.5, 3)

    def test_unknown_map(self):
        with pytest.raises(ValueError, match="map"):
            CWM(2, 3, map="spline")

    def test_negative_scales(self):
        cwm = CWM(2, 3)
        with pytest.raises(ValueError, match="scale"):
            cwm.set_gaussian_mixture(torch.ones(3) / 3, torch.zeros(3, 2), -torch.ones(3, 2))

    def test_bad_weights(self):
        cwm = CWM(2, 3)
        with pytest.raises(ValueError, match="weights"):
            cwm.set_gaussian_mixture(
                torch.tensor([1.0, 0.0, 0.0]), torch.zeros(3, 2), torch.ones(3, 2)
            )

    def test_context_missing_superfluous_or_wrong(self):
        with pytest.raises(ValueError, match="context is required"):
            CWM(2, 3, context_dim=2)()
        with pytest.raises(ValueError, match="unconditional"):
            CWM(2, 3)(torch.zeros(2))
        with pytest.raises(ValueError, match="context must have shape"):
            CWM(2, 3, context_dim=2)(torch.zeros(4, 3))
        # NaN in the context is found where it is used (a guide site can then name itself).
        nan_context = CWM(2, 3, context_dim=2)(torch.tensor([[0.0, math.nan]]))
        with pytest.raises(ValueError, match="context contains NaN"):
            nan_context.sample()
        with pytest.raises(ValueError, match="context contains NaN"):
            nan_context.log_prob(torch.zeros(2))


def _perturbed_location_scale_maps(d, K, seed):
    torch.manual_seed(seed)
    inner = build_maps("location_scale", d, K).double()
    with torch.no_grad():
        for p in inner.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return inner


def test_preconditioned_maps_invert_and_count_the_shared_jacobian():
    d, K = 3, 2
    inner = _perturbed_location_scale_maps(d, K, seed=0)
    matrix = torch.randn(d, d, dtype=torch.float64) + 2 * torch.eye(d, dtype=torch.float64)
    shift = torch.randn(d, dtype=torch.float64)
    maps = PreconditionedMaps(inner, shift, matrix)
    z = torch.randn(5, d, dtype=torch.float64)
    x = maps(z)
    assert x.shape == (5, K, d)
    back, ladj = maps.inverse(x[:, 0])
    assert torch.allclose(back[:, 0], z, atol=1e-10)
    # ladj_k = log|det dT_k^{-1}/dx| from the Jacobian of T_0 by autograd.
    jac = torch.autograd.functional.jacobian(lambda v: maps(v)[0], z[0])
    assert torch.allclose(ladj[0, 0], -torch.linalg.slogdet(jac)[1])
    with pytest.raises(ValueError, match="shift and matrix"):
        PreconditionedMaps(inner, shift[:2], matrix)


def test_diagonal_preconditioned_maps_are_the_dense_ones_with_that_diagonal():
    d, K = 4, 3
    inner = _perturbed_location_scale_maps(d, K, seed=1)
    diagonal = torch.rand(d, dtype=torch.float64) + 0.5
    shift = torch.randn(d, dtype=torch.float64)
    sparse = PreconditionedMaps(inner, shift, diagonal)
    dense = PreconditionedMaps(inner, shift, torch.diag(diagonal))
    z = torch.randn(6, d, dtype=torch.float64)
    assert torch.allclose(sparse(z), dense(z), atol=1e-12)
    x = dense(z)[:, 1]
    for got, want in zip(sparse.inverse(x), dense.inverse(x)):
        assert torch.allclose(got, want, atol=1e-12)


def test_map_choices_are_the_families_and_the_maf_preset():
    assert map_arguments("affine") == {"map": "affine", "map_options": None}
    maf = map_arguments("maf")
    assert maf == {"map": "flow", "map_options": {"flow": "maf"}}
    iaf = map_arguments("iaf")["map_options"]
    assert iaf == {"flow": "iaf"}
    assert CWM(3, 2, **map_arguments("iaf")).maps.shares_inverse
    # The preset builds a fully autoregressive (3 passes in 3-D) affine flow; the default
    # flow is a spline coupling flow (2 passes).
    for name, passes, univariate in (
        ("maf", 3, zuko.transforms.MonotonicAffineTransform),
        ("flow", 2, zuko.transforms.MonotonicRQSTransform),
    ):
        for t in CWM(3, 2, **map_arguments(name)).maps.flow.transforms:
            assert t.passes == passes
            assert getattr(t.univariate, "func", t.univariate) is univariate
    with pytest.raises(ValueError, match="map must be one of"):
        map_arguments("spline")


def test_maf_passes_group_the_coordinates_and_keep_a_normalized_density():
    # passes=2 in 4-D: a coupling (two passes to sample); passes >= dim: fully autoregressive.
    for passes, expected in ((2, 2), (4, 4), (9, 4)):
        cwm = CWM(4, 2, map="flow", map_options={"flow": "maf", "passes": passes})
        assert all(t.passes == expected for t in cwm.maps.flow.transforms)
    cwm = random_cwm(2, 3, "flow", scale=0.2).double()
    cwm.maps.flow = CWM(2, 3, map="flow", map_options={"flow": "maf", "passes": 1}).maps.flow
    cwm = cwm.double()
    with torch.no_grad():  # a flow that is not the identity
        for p in cwm.maps.flow.parameters():
            p.add_(0.1 * torch.randn_like(p))
    nodes, weights = composite_gauss_legendre(-30.0, 30.0, panels=30, nodes=20)
    x, w = torch.tensor(nodes), torch.tensor(weights)
    grid = torch.stack(torch.meshgrid(x, x, indexing="ij"), -1).reshape(-1, 2)
    with torch.no_grad():
        density = cwm().log_prob(grid).exp().reshape(len(x), len(x))
    assert (w[:, None] * w[None, :] * density).sum().item() == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="passes"):
        CWM(3, 2, map="flow", map_options={"flow": "maf", "passes": 0})


def test_moments_of_a_gaussian_mixture_match_the_closed_form():
    torch.manual_seed(2)
    K, d = 3, 2
    weights = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)
    loc = 3 * torch.randn(K, d, dtype=torch.float64)
    scale = torch.rand(K, d, dtype=torch.float64) + 0.3
    cwm = CWM(d, K).double()
    cwm.set_gaussian_mixture(weights, loc, scale)
    mean = (weights[:, None] * loc).sum(0)
    variance = (weights[:, None] * (scale**2 + loc**2)).sum(0) - mean**2
    with torch.no_grad():
        distribution = cwm()
        # Components summed out: the mean's error is (sum_k w_k scale_k) / sqrt(n) ~ 0.01.
        assert torch.allclose(distribution.mean, mean, atol=0.04)
        assert torch.allclose(distribution.variance, variance, rtol=0.05)


def test_moments_with_a_point_dependent_classifier_match_plain_draws_and_are_seeded():
    cwm = random_cwm(2, 3, context_dim=2, seed=4)
    context = torch.randn(3, 2, dtype=torch.float64)
    with torch.no_grad():
        distribution = cwm(context)
        state = torch.get_rng_state()
        mean, variance = distribution.moments(num_samples=20_000)
        assert torch.equal(torch.get_rng_state(), state)
        assert torch.equal(distribution.mean, distribution.moments()[0])
        draws = distribution.sample((200_000,))
    assert mean.shape == variance.shape == (3, 2)
    # Both estimates' errors are ~1% of a standard deviation.
    assert ((mean - draws.mean(0)).abs() < 0.05 * variance.sqrt()).all()
    assert torch.allclose(variance, draws.var(0), rtol=0.05)


@pytest.mark.parametrize("map", ["iaf", "location_scale"])
@pytest.mark.parametrize("context_dim", [0, 2])
def test_the_log_density_at_the_images_is_log_prob_there(map, context_dim):
    # "iaf" reads it from each image's shared point, without inverting the flow.
    cwm = random_cwm(3, 4, map, context_dim=context_dim, seed=3)
    if map == "iaf":
        with torch.no_grad():  # a flow that is not the identity
            for p in cwm.maps.flow.parameters():
                p.add_(0.2 * torch.randn_like(p))
    context = torch.randn(5, context_dim, dtype=torch.float64) if context_dim else None
    distribution = cwm(context)
    x, log_w, log_p = distribution.rsample_components_with_log_prob((7,))
    batch = (7, 5) if context_dim else (7,)
    assert x.shape == batch + (4, 3) and log_w.shape == log_p.shape == batch + (4,)
    expected = torch.stack([distribution.log_prob(x[..., k, :]) for k in range(4)], -1)
    assert torch.allclose(log_p, expected, atol=1e-8)
    assert cwm.maps.shares_inverse == (map == "iaf")


def test_components_start_spread_over_the_reference_unless_told_not_to():
    # Spread: the K cells of a k-means partition of N(0, I), together close to N(0, I).
    locs = CWM(3, 4)().rsample_components((2000,))[0].mean(0)  # (K, d)
    assert (torch.cdist(locs, locs) + torch.eye(4)).min() > 0.5
    # spread=False: every map the identity (for a caller that places them itself).
    images = CWM(3, 4, spread=False)().rsample_components((5,))[0]
    assert torch.equal(images, images[:, :1].expand_as(images))
