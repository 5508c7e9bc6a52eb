"""The model zoo: each model's density against a direct numpy/scipy formula, and each
reference posterior against an independent computation."""

import numpy as np
import pyro.poutine as poutine
import pytest
import torch
from scipy import stats

from pyro_cwm.data import zoo


@pytest.fixture(scope="module")
def mixture():
    return zoo.make_mixture_enum(num_draws=20_000)


def log_joint(model, args, values):
    trace = poutine.trace(poutine.condition(model, data=values)).get_trace(*args)
    return trace.log_prob_sum().item()


def test_mixture_sums_its_enumerated_assignments_as_the_formula(mixture):
    (y,) = mixture.args
    loc = torch.tensor([-1.7, 2.3])
    enumerated = poutine.enum(
        poutine.condition(mixture.model, data={"loc": loc}), first_available_dim=-2
    )
    trace = poutine.trace(enumerated).get_trace(y)
    trace.compute_log_prob()
    # z's log prob (2, 1) plus y's (2, 100): sum the assignment out per point.
    per_point = (trace.nodes["z"]["log_prob"] + trace.nodes["y"]["log_prob"]).logsumexp(0)
    got = (per_point.sum() + trace.nodes["loc"]["log_prob"]).item()
    yn = y.double().numpy()
    expected = np.log(0.5 * stats.norm(-1.7, 1).pdf(yn) + 0.5 * stats.norm(2.3, 1).pdf(yn)).sum()
    expected += stats.norm(0, 5).logpdf([-1.7, 2.3]).sum()
    assert got == pytest.approx(expected, rel=1e-5)
    assert zoo.mixture_log_joint(loc.double(), y.double()).item() == pytest.approx(expected)


def box_quadrature(y, num=401):
    """Posterior mass near the mode (loc1 < 0 < loc2) by numpy on a fine grid of
    [-3, -1] x [1, 3]; the other mode is its mirror and elsewhere the mass is negligible.
    Returns (log Z, E[loc2], sd[loc2])."""
    lo, hi = np.linspace(-3, -1, num), np.linspace(1, 3, num)
    h = lo[1] - lo[0]
    a = stats.norm.pdf(y[:, None], lo[None, :], 1)  # (N, num)
    b = stats.norm.pdf(y[:, None], hi[None, :], 1)
    log_lik = np.log(0.5 * a[:, :, None] + 0.5 * b[:, None, :]).sum(0)
    log_post = log_lik + stats.norm(0, 5).logpdf(lo)[:, None] + stats.norm(0, 5).logpdf(hi)
    top = log_post.max()
    mass = np.exp(log_post - top)
    log_z = np.log(2 * mass.sum() * h * h) + top
    weights = mass.sum(0) / mass.sum()
    mean = (weights * hi).sum()
    return log_z, mean, np.sqrt((weights * (hi - mean) ** 2).sum())


def test_mixture_quadrature_reference_matches_a_fine_box_quadrature(mixture):
    log_z, mean, sd = box_quadrature(mixture.args[0].double().numpy())
    assert mixture.log_z == pytest.approx(log_z, abs=1e-6)
    larger = mixture.draws.max(-1).values
    assert larger.mean().item() == pytest.approx(mean, abs=0.01)
    assert larger.std().item() == pytest.approx(sd, rel=0.03)
    # Label switching: both orders equally likely.
    share = (mixture.draws[:, 0] > mixture.draws[:, 1]).float().mean().item()
    assert share == pytest.approx(0.5, abs=0.02)


def test_hierarchical_model_and_conjugate_reference():
    post = zoo.make_hierarchical(num_groups=20, subsample_size=5, num_draws=20_000)
    y, _ = post.args
    assert post.full_args[1] is None and post.global_sites == ["mu"]
    yn = y.double().numpy()
    # The model's density at a point (full data) against scipy.
    theta = torch.linspace(-1.0, 3.0, 20)
    got = log_joint(post.model, post.full_args, {"mu": torch.tensor(0.7), "theta": theta})
    expected = (
        stats.norm(0, 10).logpdf(0.7)
        + stats.norm(0.7, 1).logpdf(theta.numpy()).sum()
        + stats.norm(theta.numpy()[:, None], 2).logpdf(yn).sum()
    )
    assert got == pytest.approx(expected, rel=1e-5)
    # The posterior of mu and the evidence by 1-D quadrature of p(mu) p(y | mu), theta
    # integrated out with scipy's multivariate normal per group.
    n = yn.shape[1]
    cov = 4 * np.eye(n) + 1
    grid = np.linspace(-3, 6, 3001)
    log_lik = np.array(
        [stats.multivariate_normal(np.full(n, m), cov).logpdf(yn).sum() for m in grid]
    )
    log_post = log_lik + stats.norm(0, 10).logpdf(grid)
    top = log_post.max()
    w = np.exp(log_post - top)
    log_z = np.log(w.sum() * (grid[1] - grid[0])) + top
    mean = (w * grid).sum() / w.sum()
    sd = np.sqrt((w * (grid - mean) ** 2).sum() / w.sum())
    assert post.log_z == pytest.approx(log_z, abs=1e-6)
    assert post.draws.mean().item() == pytest.approx(mean, abs=0.02 * sd)
    assert post.draws.std().item() == pytest.approx(sd, rel=0.02)


def test_hierarchical_subsamples_its_plate():
    post = zoo.make_hierarchical(num_groups=20, subsample_size=5)
    trace = poutine.trace(post.model).get_trace(*post.args)
    assert trace.nodes["theta"]["value"].shape == (5,)
    assert trace.nodes["groups"]["value"].shape == (5,)


def test_logistic_model_and_reference():
    post = zoo.make_logistic(num_points=2000, subsample_size=100, num_draws=4000)
    x, y, _ = post.args
    b, w = torch.tensor(-0.3), torch.tensor([0.5, -1.0, 0.2])
    got = log_joint(post.model, post.full_args, {"b": b, "w": w})
    p = 1 / (1 + np.exp(-(-0.3 + x.double().numpy() @ w.double().numpy())))
    expected = (
        stats.bernoulli(p).logpmf(y.numpy()).sum()
        + stats.norm(0, 1).logpdf(-0.3)
        + stats.norm(0, 1).logpdf(w.numpy()).sum()
    )
    assert got == pytest.approx(expected, rel=1e-5)
    # The subsampled model scales the likelihood by N / n.
    trace = poutine.trace(post.model).get_trace(*post.args)
    assert trace.nodes["y"]["scale"] == pytest.approx(20.0)
    # The importance-resampled reference is near the Laplace Gaussian but not equal to it.
    design = np.hstack((np.ones((2000, 1)), x.double().numpy()))
    from scipy.optimize import minimize

    def neg_log_post(beta):
        logits = design @ beta
        return -(y.numpy() * logits - np.logaddexp(0, logits)).sum() + 0.5 * beta @ beta

    mode = minimize(neg_log_post, np.zeros(4), method="BFGS", options={"gtol": 1e-8}).x
    pr = 1 / (1 + np.exp(-design @ mode))
    laplace_sd = np.sqrt(np.diag(np.linalg.inv((design.T * pr * (1 - pr)) @ design + np.eye(4))))
    draws = post.draws.double().numpy()
    assert np.all(np.abs(draws.mean(0) - mode) < 0.15 * laplace_sd)
    assert np.allclose(draws.std(0), laplace_sd, rtol=0.08)


def test_linreg100_exact_posterior_against_numpy():
    post = zoo.make_linreg100(dim=100, num_points=200, num_draws=20_000)
    x, y = (a.double().numpy() for a in post.args)
    assert post.draws.shape == (20_000, 100)
    precision = np.eye(100) + x.T @ x
    mean = np.linalg.solve(precision, x.T @ y)
    cov = np.linalg.inv(precision)
    assert np.allclose(
        post.draws.double().mean(0).numpy(), mean, atol=0.03 * np.sqrt(cov.diagonal()).max()
    )
    assert np.allclose(post.draws.double().std(0).numpy(), np.sqrt(cov.diagonal()), rtol=0.03)
    log_z = stats.multivariate_normal(np.zeros(200), x @ x.T + np.eye(200)).logpdf(y)
    assert post.log_z == pytest.approx(log_z, rel=1e-8)
    w = torch.linspace(-1, 1, 100)
    got = log_joint(post.model, post.args, {"w": w})
    expected = (
        stats.norm(x @ w.double().numpy(), 1).logpdf(y).sum()
        + stats.norm(0, 1).logpdf(w.numpy()).sum()
    )
    assert got == pytest.approx(expected, rel=1e-5)


def test_zoo_lists_its_builders():
    assert set(zoo.ZOO) == {"mixture_enum", "hierarchical", "logistic", "linreg100"}
