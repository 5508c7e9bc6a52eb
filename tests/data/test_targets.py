"""Analytic targets: normalized (quadrature) and their samplers exact (chi-square)."""

import math

import pytest
import torch

from pyro_cwm.data.targets import TARGETS
from tests.helpers import binned_goodness_of_fit, composite_gauss_legendre


class _Density:
    def __init__(self, target):
        self.target = target

    def log_prob(self, x):
        return self.target.log_prob(x.float()).double()


@pytest.mark.parametrize(
    "name, second_axis", [("ring", (-12, 12)), ("two-moons", (-12, 12)), ("banana", (-8, 80))]
)
def test_two_dimensional_targets_are_normalized_and_sampled_exactly(name, second_axis):
    target = TARGETS[name]()
    nx, wx = composite_gauss_legendre(-12.0, 12.0, panels=48, nodes=12)
    ny, wy = composite_gauss_legendre(*second_axis, panels=160, nodes=12)
    grid = torch.cartesian_prod(torch.tensor(nx), torch.tensor(ny)).float()
    density = target.log_prob(grid).double().exp().reshape(len(nx), len(ny))
    total = (torch.tensor(wx)[:, None] * torch.tensor(wy)[None, :] * density).sum().item()
    assert total == pytest.approx(1.0, abs=2e-3)
    samples = target.sample(20000, torch.Generator().manual_seed(0)).double()
    assert binned_goodness_of_fit(_Density(target), samples, low=-6.0, high=6.0) > 1e-3


@pytest.mark.parametrize("name", ["funnel", "two-gaussians", "two-gaussians-unequal"])
def test_high_dimensional_targets_sample_their_marginals(name):
    target = TARGETS[name]()
    samples = target.sample(20000, torch.Generator().manual_seed(1))
    assert samples.shape == (20000, target.dim)
    if name == "funnel":
        assert samples[:, 0].std().item() == pytest.approx(3.0, rel=0.03)
    else:
        right = samples.mean(-1) > 0  # which mode: all 10 coordinates agree
        share = 0.5 if name == "two-gaussians" else 0.3
        assert right.float().mean().item() == pytest.approx(share, abs=0.02)
        assert samples[right, 1].std().item() == pytest.approx(
            1.0 if name == "two-gaussians" else 0.71, rel=0.05
        )
    assert torch.isfinite(target.log_prob(samples)).all()


def test_unequal_two_gaussians_density_is_the_mixture_formula():
    # log(0.7 N(x; -3, 1) + 0.3 N(x; 3, 0.71^2)) per dimension product, by scipy
    from scipy import stats

    target = TARGETS["two-gaussians-unequal"]()
    x = torch.randn(50, 10, generator=torch.Generator().manual_seed(2)) * 3
    left = stats.norm(-3.0, 1.0).logpdf(x.double().numpy()).sum(-1)
    right = stats.norm(3.0, 0.71).logpdf(x.double().numpy()).sum(-1)
    expected = torch.logaddexp(
        torch.tensor(left) + math.log(0.7), torch.tensor(right) + math.log(0.3)
    )
    assert torch.allclose(target.log_prob(x).double(), expected, atol=1e-4)
