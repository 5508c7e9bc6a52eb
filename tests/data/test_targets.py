"""Analytic targets: normalized (quadrature) and their samplers exact (chi-square)."""

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


@pytest.mark.parametrize("name", ["funnel", "two-gaussians"])
def test_high_dimensional_targets_sample_their_marginals(name):
    target = TARGETS[name]()
    samples = target.sample(20000, torch.Generator().manual_seed(1))
    assert samples.shape == (20000, target.dim)
    if name == "funnel":
        assert samples[:, 0].std().item() == pytest.approx(3.0, rel=0.03)
    else:
        assert (samples[:, 0] > 0).float().mean().item() == pytest.approx(0.5, abs=0.02)
    assert torch.isfinite(target.log_prob(samples)).all()
