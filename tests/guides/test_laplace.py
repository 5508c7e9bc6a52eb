"""Hessians, Newton refinement and the Laplace start of AutoCWM, against closed forms."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from inference import CWMELBO, fit_svi
from pyro_cwm.data.posteriors import tight_regression
from pyro_cwm.guides import AutoCWM
from pyro_cwm.guides.laplace import (
    laplace_misfit,
    laplace_preconditioner,
    laplace_scales,
    log_joint_derivatives,
    newton_refine,
    secant_widths,
)
from pyro_cwm.guides.log_joint import rowwise

# A kilpisjarvi-like posterior: correlation -0.99999, scales 30 and 0.0075.
COV = torch.tensor([[900.0, -0.2249991], [-0.2249991, 5.625e-5]], dtype=torch.float64)
MEAN = torch.tensor([-61.0, 0.0176], dtype=torch.float64)


def gaussian_log_joint(u):
    return dist.MultivariateNormal(MEAN, COV).log_prob(u)


def gaussian_model():
    pyro.sample("x", dist.MultivariateNormal(MEAN, COV))


def test_hessians_of_many_points_are_exact():
    u = torch.randn(3, 2, dtype=torch.float64)
    log_p, grad, hess = log_joint_derivatives(gaussian_log_joint, u)
    precision = torch.linalg.inv(COV)
    assert torch.allclose(log_p, gaussian_log_joint(u))
    assert torch.allclose(grad, -(u - MEAN) @ precision)
    assert torch.allclose(hess, -precision.expand(3, 2, 2), rtol=1e-9)


def test_hessian_of_a_linear_log_density_is_zero():
    log_p, grad, hess = log_joint_derivatives(lambda u: u.sum(-1), torch.zeros(2, 3))
    assert torch.equal(hess, torch.zeros(2, 3, 3)) and torch.equal(grad, torch.ones(2, 3))


def test_newton_crosses_a_narrow_ridge_that_adam_cannot():
    start = torch.tensor([9.0, 0.0], dtype=torch.float64)
    mode, converged = newton_refine(gaussian_log_joint, start)
    assert converged
    assert torch.allclose(mode, MEAN, rtol=1e-6)


def test_newton_reports_no_mode_where_there_is_none():
    # Unbounded above: every step improves, none converges.
    _, converged = newton_refine(
        lambda u: u.sum(-1) - 1e-3 * u.pow(2).sum(-1).sqrt(), torch.zeros(1, 2)[0], steps=5
    )
    assert not converged


def test_laplace_misfit_is_half_the_variance_of_the_log_ratio():
    # log p = -x^2 / 2 + a x^3: the Laplace Gaussian at 0 is N(0, 1), the log-ratio is
    # a x^3 + const, and Var(x^3) = E x^6 = 15 under N(0, 1).
    a, x0, one = 0.2, torch.zeros(1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64)
    torch.manual_seed(0)
    misfit = laplace_misfit(lambda u: (-0.5 * u**2 + a * u**3).sum(-1), x0, one, 200_000)
    assert misfit == pytest.approx(0.5 * 15 * a**2, rel=0.06)  # sampling sd 1.5%
    # An exactly Gaussian log density (correlation -0.99999) has none.
    precision = torch.linalg.inv(COV)
    assert laplace_misfit(gaussian_log_joint, MEAN, precision) < 1e-8
    assert laplace_misfit(gaussian_log_joint, MEAN, -precision) == math.inf
    assert laplace_misfit(lambda u: u.sum(-1).log(), x0, one) == math.inf  # NaN at x < 0
    # The draws reach the log density in chunks; the figure does not depend on them.
    seen = []

    def counting(u):
        seen.append(u.shape[0])
        return gaussian_log_joint(u) + 0.1 * u[:, 0] ** 3

    def misfit_in_chunks_of(chunk):
        torch.manual_seed(1)
        seen.clear()
        misfit = laplace_misfit(counting, MEAN, precision, num_draws=256, chunk=chunk)
        assert max(seen) == chunk and sum(seen) == 256
        return misfit

    assert misfit_in_chunks_of(10) == pytest.approx(misfit_in_chunks_of(256), rel=1e-12)


def test_rowwise_gives_minus_infinity_where_the_model_raises_and_values_elsewhere():
    def fragile(u):  # raises for the whole batch if any row has u_0 > 1
        if (u[:, 0] > 1).any():
            raise ValueError("covariance not positive definite")
        return gaussian_log_joint(u)

    u = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.5, 0.1], [3.0, 1.0], [-1.0, 0.0]])
    u = u.double().requires_grad_(True)
    log_p = rowwise(fragile)(u)
    good = torch.tensor([True, False, True, False, True])
    assert torch.equal(log_p[~good], torch.full((2,), -math.inf, dtype=torch.float64))
    assert torch.allclose(log_p[good], gaussian_log_joint(u[good]))
    (grad,) = torch.autograd.grad(log_p[good].sum(), u)
    assert torch.allclose(grad[good], -(u[good] - MEAN) @ torch.linalg.inv(COV))
    assert torch.equal(grad[~good], torch.zeros(2, 2, dtype=torch.float64))
    # Where every row raises, the model's own error comes back.
    with pytest.raises(ValueError, match="not positive definite"):
        rowwise(fragile)(u[~good])

    def one_at_a_time(u):  # a model that does not vectorize
        if u.shape[0] > 1:
            raise RuntimeError("shape mismatch")
        return gaussian_log_joint(u)

    with pytest.raises(RuntimeError, match="shape mismatch"):
        rowwise(one_at_a_time)(u)


def test_preconditioner_gives_unit_principal_axes_above_the_floor():
    precision = torch.linalg.inv(COV)
    matrix = laplace_preconditioner(precision, floor=1e-3)
    # Principal sds ~2e-5 and 30: the wide axis gets unit width, the narrow one (below the
    # floor) width sd / floor.
    narrow = torch.linalg.eigvalsh(COV).min().sqrt()
    whitened = matrix.T @ precision @ matrix
    widths = torch.linalg.eigvalsh(whitened).rsqrt().sort().values
    assert torch.allclose(widths, torch.stack((narrow / 1e-3, torch.tensor(1.0).double())))
    scales = laplace_scales(precision[None], matrix, default=0.1)
    assert scales.shape == (1, 2) and (scales <= 1).all()
    # Without curvature the default scale is used.
    assert torch.equal(
        laplace_scales(-precision[None], matrix, 0.1), torch.full((1, 2), 0.1, dtype=COV.dtype)
    )


def quartic_log_joint(u):
    """A unit Gaussian in u_0 and a ridge flat to second order in u_1 (falls as u_1^4)."""
    return -0.5 * u[..., 0] ** 2 - u[..., 1] ** 4 - 1e-6 * u[..., 1] ** 2


def test_secant_widths_shrink_an_axis_that_is_flat_only_to_second_order():
    mode = torch.zeros(2, dtype=torch.float64)
    _, _, hess = log_joint_derivatives(quartic_log_joint, mode[None])
    matrix = laplace_preconditioner(-hess[0], floor=0.0)
    assert matrix.norm(dim=0).max() > 500  # the curvature says: 707 wide
    checked = secant_widths(quartic_log_joint, mode, matrix)
    widths = checked.abs().max(0).values  # the axes are the coordinate axes
    lengths = dict(zip(matrix.abs().argmax(0).tolist(), widths.tolist()))
    assert lengths[0] == pytest.approx(1.0)  # Gaussian: the Laplace width is kept
    # u_1^4 = 1/2 at 0.84; a Gaussian's sd drops 1/2 nat: within a factor sqrt(2).
    assert 0.84 / 2**0.5 <= lengths[1] <= 0.84
    # Never below the floor.
    floored = secant_widths(quartic_log_joint, mode, matrix, floor=2.0)
    assert floored.norm(dim=0).min() == pytest.approx(1.0)
    assert sorted(floored.norm(dim=0).tolist())[1] == pytest.approx(2.0)


def test_autocwm_components_start_no_wider_than_a_flat_ridge_allows():
    def ridge():
        x = pyro.sample("x", dist.Normal(0.0, 10.0).expand([2]).to_event(1))
        pyro.factor("ridge", quartic_log_joint(x) - dist.Normal(0.0, 10.0).log_prob(x).sum(-1))

    pyro.set_rng_seed(0)
    guide = AutoCWM(ridge, num_components=2)
    guide()
    assert guide._best_is_mode
    draws = guide.get_posterior().sample((4000,))
    # The curvature alone would give components hundreds of units wide along u_1.
    assert draws[:, 1].std() < 1.5 and draws[:, 0].std() < 1.5


def test_autocwm_starts_at_the_laplace_approximation_of_a_correlated_posterior():
    guide = AutoCWM(gaussian_model, num_components=2)
    guide()
    posterior = guide.get_posterior()
    # Component 0 is the Laplace approximation: here the exact posterior.
    component = posterior.maps(torch.zeros(2, dtype=torch.float64))[0]
    assert torch.allclose(component, MEAN, rtol=1e-6)
    x = dist.MultivariateNormal(MEAN, COV).sample((2000,))
    exact = dist.MultivariateNormal(MEAN, COV).log_prob(x)
    # Mixture of two components of weight 1/2: component 0 alone gives log q >= log p - log 2.
    assert (posterior.log_prob(x) >= exact - math.log(2) - 1e-6).all()


def test_autocwm_fits_a_correlated_posterior_that_adam_alone_cannot():
    guide = AutoCWM(gaussian_model, num_components=1)
    fit_svi(gaussian_model, guide, num_steps=300, progress=False, loss=CWMELBO(num_particles=4))
    samples = guide.get_posterior().sample((4000,))
    assert ((samples.mean(0) - MEAN) / COV.diagonal().sqrt()).abs().max() < 0.15
    ratio = samples.std(0) / COV.diagonal().sqrt()
    assert ((ratio > 0.8) & (ratio < 1.2)).all()
    corr = torch.corrcoef(samples.T)[0, 1]
    assert corr < -0.999


def test_without_laplace_the_start_is_isotropic():
    guide = AutoCWM(gaussian_model, num_components=2, laplace=False, init_scale=0.2)
    guide()
    maps = guide.get_posterior().maps
    assert maps.diagonal and torch.equal(maps.matrix, torch.ones(2, dtype=maps.matrix.dtype))
    assert torch.allclose(guide.cwm.maps.loc_log_scale()[1].exp(), torch.tensor(0.2).double())


def test_bad_laplace_options():
    with pytest.raises(ValueError, match="laplace_floor"):
        AutoCWM(gaussian_model, laplace_floor=0.0)
    with pytest.raises(ValueError, match="newton_steps"):
        AutoCWM(gaussian_model, newton_steps=-1)


def test_newton_converges_in_float32_where_the_log_density_is_large():
    # A regression on 10^4 points: log p ~ 1e4, whose float32 rounding (1e-3 nats) is far
    # above the float64 tolerance; the mode must still be recognized.
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(10_000, 3, generator=generator) + torch.tensor([2.0, -1.0, 0.5])
    y = x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(10_000, generator=generator)

    def log_joint(beta):
        return dist.Normal(beta @ x.T, 0.1).log_prob(y).sum(-1) - 0.5 * beta.pow(2).sum(-1)

    mode, converged = newton_refine(log_joint, torch.zeros(3))
    assert converged
    x64, y64 = x.double(), y.double()
    exact = torch.linalg.solve(x64.T @ x64 / 0.01 + torch.eye(3).double(), x64.T @ y64 / 0.01)
    sd = torch.linalg.inv(x64.T @ x64 / 0.01 + torch.eye(3).double()).diagonal().sqrt()
    assert ((mode.double() - exact) / sd).abs().max() < 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_autocwm_with_defaults_settles_on_a_tight_regression(dtype):
    """Posterior sds 1e-3 of the prior's: means within 0.2 sd, sds within 20%, at 2000 steps."""
    model, (x, y), mean, sd = tight_regression(dtype)
    pyro.set_rng_seed(0)
    guide = AutoCWM(model)
    fit_svi(model, guide, x, y, num_steps=2000, progress=False)
    torch.manual_seed(1)
    draws = guide.get_posterior().sample((20_000,)).double()
    assert ((draws.mean(0) - mean) / sd).abs().max() < 0.2
    ratio = draws.std(0) / sd
    assert ((ratio > 0.8) & (ratio < 1.25)).all()
