"""Image densities and the logit map, against scipy and autograd."""

import numpy as np
import pytest
import torch
from scipy import stats

from pyro_cwm.data import LogitTransform, pixel_density_sample, ring_of_gaussians, two_moons


def test_uniform_image_gives_uniform_points():
    points = pixel_density_sample(np.ones((7, 11)), 4000, seed=0).numpy()
    for column in points.T:
        assert stats.kstest(column, "uniform").pvalue > 1e-3


def test_pixel_masses_follow_intensities():
    grey = np.array([[0.0, 3.0], [1.0, 0.0]])  # top-right pixel 3/4, bottom-left 1/4
    points = pixel_density_sample(grey, 8000, seed=1).numpy()
    top_right = ((points[:, 0] > 0.5) & (points[:, 1] > 0.5)).mean()
    bottom_left = ((points[:, 0] < 0.5) & (points[:, 1] < 0.5)).mean()
    assert top_right + bottom_left == 1.0
    assert stats.binomtest(int(top_right * 8000), 8000, 0.75).pvalue > 1e-3


def test_bad_images_raise():
    with pytest.raises(ValueError, match="grey"):
        pixel_density_sample(np.zeros((3, 3)), 10)
    with pytest.raises(ValueError, match="grey"):
        pixel_density_sample(np.ones(5), 10)


def test_logit_log_det_matches_autograd():
    transform = LogitTransform(0.05)
    x = torch.tensor([0.02, 0.3, 0.97], dtype=torch.float64)
    derivative = torch.func.vmap(torch.func.grad(lambda v: transform(v)))(x)
    assert torch.allclose(transform.log_abs_det_jacobian(x, transform(x)), derivative.log())
    assert torch.allclose(transform.inv(transform(x)), x)


def test_toy_data_are_reproducible_and_shaped():
    assert torch.equal(two_moons(50, seed=3), two_moons(50, seed=3))
    ring = ring_of_gaussians(4000, num_modes=4, radius=5.0, scale=0.1, seed=0)
    angles = torch.atan2(ring[:, 1], ring[:, 0])
    modes = torch.round(angles / (torch.pi / 2)) % 4
    counts = torch.bincount(modes.long(), minlength=4).numpy()
    assert stats.chisquare(counts).pvalue > 1e-3
