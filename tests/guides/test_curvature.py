"""pyro_cwm.guides.curvature: Hessian-vector products, the diagonal-plus-low-rank curvature
and L-BFGS, against dense Hessians and closed-form modes."""

import pytest
import torch

from pyro_cwm.guides.curvature import (
    lbfgs_mode,
    low_rank_curvature,
    negative_hessian_products,
)
from pyro_cwm.nn.maps import PreconditionedMaps, build_maps


@pytest.fixture(autouse=True)
def float64():
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(default)


def gaussian(precision, mean):
    def log_joint(u):
        centred = u - mean
        return -0.5 * ((centred @ precision) * centred).sum(-1)

    return log_joint


def random_precision(d, spectrum, seed=0):
    generator = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator))
    return (q * spectrum) @ q.T


def dense(curvature):
    """A = diag(scale) (I + U diag(widths - 1) U^T) as a d x d matrix, by matrix products."""
    u, w = curvature.vectors, curvature.widths
    inner = torch.eye(u.shape[0]) + u @ torch.diag(w - 1) @ u.T
    return torch.diag(curvature.scale) @ inner


def test_hessian_vector_products_match_the_dense_hessian_of_a_non_quadratic_density():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(30, 5, generator=generator)
    y = torch.bernoulli(torch.full((30,), 0.5), generator=generator)

    def log_joint(u):
        logits = u @ x.T
        return (y * logits - torch.nn.functional.softplus(logits)).sum(-1) - (u**4).sum(-1)

    u = torch.randn(5, generator=generator)
    hessian = torch.autograd.functional.hessian(lambda v: log_joint(v[None])[0], u)
    vectors = torch.randn(3, 5, generator=generator)
    products = negative_hessian_products(log_joint, u, vectors)
    assert torch.allclose(products, -vectors @ hessian, atol=1e-10)


def test_a_krylov_space_of_the_whole_dimension_gives_the_exact_inverse_hessian():
    d = 12
    precision = random_precision(d, torch.logspace(-3, 3, d))
    torch.manual_seed(0)
    curvature = low_rank_curvature(gaussian(precision, torch.zeros(d)), torch.zeros(d), d, 4)
    a = dense(curvature)
    assert curvature.positive and curvature.vectors.shape == (d, d)
    assert torch.allclose(a @ a.T, torch.linalg.inv(precision), rtol=1e-6, atol=1e-9)


def test_a_few_wide_or_narrow_directions_over_an_isotropic_rest_are_found_exactly():
    # P = 2 I except along 3 directions: the Krylov space closes on them and the probes.
    d, m = 200, 3
    spectrum = torch.full((d,), 2.0)
    spectrum[:m] = torch.tensor([1e-4, 5e2, 3e5])
    precision = random_precision(d, spectrum, seed=2)
    torch.manual_seed(0)
    curvature = low_rank_curvature(gaussian(precision, torch.zeros(d)), torch.zeros(d), 16, 4)
    a = dense(curvature)
    # A^T P A = I: every direction, the rest included, has its exact width.
    assert torch.allclose(torch.linalg.eigvalsh(a.T @ precision @ a), torch.ones(d), atol=1e-8)
    assert torch.allclose(curvature.scale, torch.full((d,), 2.0**-0.5))


def test_no_width_below_the_floor_and_negative_curvature_is_not_positive():
    d = 40
    spectrum = torch.linspace(1.0, 10.0, d)
    spectrum[0] = -1e4  # an extreme direction, which the Krylov space finds first
    precision = random_precision(d, spectrum, seed=3)
    torch.manual_seed(0)
    curvature = low_rank_curvature(gaussian(precision, torch.zeros(d)), torch.zeros(d), 8, 4)
    assert not curvature.positive
    assert curvature.widths.min() < 1  # the narrow directions
    curvature = curvature.floored(0.1)
    assert (curvature.scale >= 0.1).all() and (curvature.widths >= 1).all()


def test_the_low_rank_preconditioner_round_trips_and_has_the_dense_log_determinant():
    d = 30
    precision = random_precision(d, torch.logspace(-2, 2, d), seed=4)
    torch.manual_seed(0)
    curvature = low_rank_curvature(gaussian(precision, torch.zeros(d)), torch.zeros(d), 8, 4)
    shift = torch.randn(d)
    maps = PreconditionedMaps(
        build_maps("location_scale", d, 2), shift, curvature.scale, curvature.vectors,
        curvature.widths,
    )
    y = torch.randn(5, d)
    x = maps.from_inner(y)
    assert torch.allclose(x, shift + y @ dense(curvature).T, atol=1e-10)
    assert torch.allclose(maps.to_inner(x), y, atol=1e-10)
    assert torch.allclose(maps.log_abs_det, torch.linalg.slogdet(dense(curvature))[1])
    with pytest.raises(ValueError, match="vectors and widths"):
        PreconditionedMaps(build_maps("location_scale", d, 2), shift, curvature.scale,
                           curvature.vectors, curvature.widths[:-1])


def test_lbfgs_reaches_the_mode_of_an_ill_conditioned_gaussian_and_never_goes_down():
    d = 50
    precision = random_precision(d, torch.logspace(0, 4, d), seed=5)
    mean = torch.randn(d)
    log_joint = gaussian(precision, mean)
    point, value = lbfgs_mode(log_joint, torch.zeros(d), tol=1e-12)
    # Within 1e-8 nats of the maximum: 1e-4 posterior sds in the metric of the precision.
    assert torch.allclose(point, mean, atol=1e-4) and value.item() > -1e-8
    # Not finite anywhere but at the start: the start is kept.
    def spike(u):
        return torch.where((u == 0).all(-1), torch.zeros(u.shape[0]), -torch.inf) - u.sum(-1)

    point, value = lbfgs_mode(spike, torch.zeros(d))
    assert torch.equal(point, torch.zeros(d)) and value.item() == 0


def test_lbfgs_climbs_a_coarse_log_joint_first_and_finishes_on_the_precise_one():
    # The coarse one is the same density in float32 beside a large constant (as a model's
    # log joint of thousands of nats): its values are 1e-3 apart, too coarse to finish.
    d = 50
    precision = random_precision(d, torch.logspace(0, 3, d), seed=6)
    mean = torch.randn(d)
    precise, calls = gaussian(precision, mean), {"coarse": 0, "precise": 0}

    def coarse(u):
        calls["coarse"] += 1
        assert u.dtype == torch.float32
        return gaussian(precision.float(), mean.float())(u) - 1e4

    def counted(u):
        calls["precise"] += 1
        return precise(u)

    point, value = lbfgs_mode(counted, torch.zeros(d), tol=1e-9, coarse=(coarse, torch.float32))
    assert calls["coarse"] > 10 and calls["precise"] > 2
    assert torch.allclose(point, mean, atol=1e-5)
    assert value.dtype == torch.float64 and value.item() == precise(point[None]).item()
