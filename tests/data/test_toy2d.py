"""The 2-D toy targets: exact samplers against exact densities, densities against scipy."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, special, stats

from pyro_cwm.data import TOY_DENSITIES, toy2d, toy_density

NAMES = sorted(TOY_DENSITIES)


def cell_probabilities(log_prob, edges: torch.Tensor, sub: int) -> np.ndarray:
    """Mass of every cell of the grid ``edges`` x ``edges`` by the midpoint rule on
    ``sub`` x ``sub`` points per cell; shape (cells, cells)."""
    n = edges.numel() - 1
    width = (edges[1] - edges[0]).item()
    fine = edges[0] + (torch.arange(n * sub, dtype=torch.float64) + 0.5) * width / sub
    points = torch.cartesian_prod(fine, fine)
    dens = log_prob(points).exp().reshape(n, sub, n, sub)
    return (dens.sum((1, 3)) * (width / sub) ** 2).numpy()


@pytest.mark.parametrize("name", NAMES)
def test_sampler_matches_the_exact_density_in_a_chi_square_test_on_cells(name):
    toy = toy_density(name)
    low, high = toy.bounds
    edges = torch.linspace(low, high, 9, dtype=torch.float64)
    prob = cell_probabilities(toy.log_prob, edges, sub=24)
    outside = 1 - prob.sum()
    assert -1e-3 < outside < 5e-3, outside  # the density integrates to one
    n = 20_000
    x = toy.sample(n, seed=0).double().numpy()
    counts, _, _ = np.histogram2d(x[:, 0], x[:, 1], bins=[edges.numpy()] * 2)
    observed = np.append(counts.ravel(), n - counts.sum())
    expected = n * np.append(prob.ravel(), max(outside, 0.0))
    # The chi-square approximation needs populated cells: pool the sparse ones into one.
    keep = expected > 5
    obs, exp = observed[keep], expected[keep]
    if expected[~keep].sum() > 1e-9:
        obs = np.append(obs, observed[~keep].sum())
        exp = np.append(exp, expected[~keep].sum())
    else:  # cells outside the support
        assert observed[~keep].sum() == 0
    result = stats.chisquare(obs, exp * n / exp.sum())
    assert result.pvalue > 1e-3, (name, result)


@pytest.mark.parametrize("name", NAMES)
def test_samplers_are_seeded_and_log_prob_keeps_the_dtype(name):
    toy = toy_density(name)
    a, b = toy.sample(50, seed=3), toy.sample(50, seed=3)
    assert a.shape == (50, 2) and torch.equal(a, b)
    assert not torch.equal(a, toy.sample(50, seed=4))
    lp = toy.log_prob(a.reshape(5, 10, 2))
    assert lp.shape == (5, 10) and lp.dtype == a.dtype and torch.isfinite(lp).all()


def test_eight_gaussians_density_is_the_scipy_mixture():
    x = torch.tensor([[0.0, 0.0], [2.8, 0.1], [-1.9, 2.1], [3.5, -3.0]], dtype=torch.float64)
    angles = 2 * np.pi * np.arange(8) / 8
    r, s = 4 / 1.414, 0.5 / 1.414
    ref = (
        sum(
            stats.multivariate_normal([r * np.cos(a), r * np.sin(a)], s**2 * np.eye(2)).pdf(x)
            for a in angles
        )
        / 8
    )
    np.testing.assert_allclose(toy2d.eight_gaussians_log_prob(x).numpy(), np.log(ref), rtol=1e-10)


def test_rings_density_is_the_angle_integral_by_scipy_quad():
    s = 0.08
    for point in [(0.7, 0.1), (1.5, 1.2), (0.0, 2.26), (-2.0, -2.1)]:

        def integrand(t, point=point):
            total = 0.0
            for radius in (0.75, 1.5, 2.25, 3.0):
                c = radius * np.array([np.cos(t), np.sin(t)])
                total += stats.multivariate_normal(c, s**2 * np.eye(2)).pdf(point) / 4
            return total / (2 * np.pi)

        peak = np.arctan2(point[1], point[0]) % (2 * np.pi)
        ref = integrate.quad(integrand, 0, 2 * np.pi, limit=400, epsabs=0, points=[peak])[0]
        got = toy2d.rings_log_prob(torch.tensor(point, dtype=torch.float64)).exp().item()
        assert got == pytest.approx(ref, rel=1e-6)


def test_moons_density_is_the_angle_integral_by_scipy_quad():
    sd = 0.2

    def integrand(a, point):
        up = np.array([2 * np.cos(a) - 1, 2 * np.sin(a) - 0.2])
        down = np.array([1 - 2 * np.cos(a), 0.8 - 2 * np.sin(a)])
        pdf = lambda c: np.exp(-np.sum((point - c) ** 2) / (2 * sd**2)) / (2 * np.pi * sd**2)  # noqa: E731
        return (pdf(up) + pdf(down)) / (2 * np.pi)

    for point in [(0.0, 1.8), (1.0, -0.6), (-1.1, 0.3), (2.5, 2.5)]:
        ref = integrate.quad(integrand, 0, np.pi, args=(np.array(point),), limit=400, epsabs=0)[0]
        got = toy2d.moons_log_prob(torch.tensor(point, dtype=torch.float64)).exp().item()
        assert got == pytest.approx(ref, rel=1e-6)


def test_spirals_density_is_the_arm_integral_by_scipy_quad():
    turn, sd, box = 3 * np.pi, 0.1, 0.5 / 3

    def one_dim(x, low):
        return (special.ndtr((x - low) / sd) - special.ndtr((x - low - box) / sd)) / box

    def integrand(t, point):
        c = np.array([-np.cos(t) * t, np.sin(t) * t]) / 3
        arm = np.prod(one_dim(point, c)) + np.prod(one_dim(-point, c))
        return arm / 2 * 2 * t / turn**2

    for point in [(0.3, 0.2), (-1.0, 1.5), (2.9, -0.4), (1.0, -2.6)]:
        ref = integrate.quad(integrand, 0, turn, args=(np.array(point),), limit=2000, epsabs=0)[0]
        got = toy2d.spirals_log_prob(torch.tensor(point, dtype=torch.float64)).exp().item()
        assert got == pytest.approx(ref, rel=1e-5)


def test_checkerboard_density_is_uniform_on_the_dark_squares():
    x = torch.tensor([[0.5, 0.5], [-0.5, 0.5], [3.9, 3.9], [4.5, 0.0]])
    lp = toy2d.checkerboard_log_prob(x)
    assert lp[0] == pytest.approx(-math.log(32)) and lp[2] == pytest.approx(-math.log(32))
    assert lp[1] == -math.inf and lp[3] == -math.inf


def test_unknown_toy_and_bad_points_are_rejected():
    with pytest.raises(ValueError, match="toy must be one of"):
        toy_density("swissroll")
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 2\)"):
        toy2d.rings_log_prob(torch.zeros(3, 3))
    with pytest.raises(ValueError, match="num_points"):
        toy2d.pinwheel(0)
