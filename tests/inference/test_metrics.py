"""Sample metrics against scipy and numpy."""

import numpy as np
import pytest
import torch
from scipy import stats

from inference.diagnostics.metrics import (
    energy_distance,
    marginal_errors,
    mode_shares,
    worst_mode_share_error,
)


def test_energy_distance_matches_scipy_in_one_dimension():
    rng = np.random.default_rng(0)
    x, y = rng.normal(0, 1, 300), rng.normal(0.5, 2, 400)
    # scipy's energy distance is the square root of ours (its definition has a sqrt).
    ours = energy_distance(torch.tensor(x)[:, None], torch.tensor(y)[:, None])
    assert ours == pytest.approx(stats.energy_distance(x, y) ** 2, rel=1e-9)


def test_energy_distance_is_zero_for_identical_samples_and_grows_with_a_shift():
    x = torch.randn(500, 3, generator=torch.Generator().manual_seed(1))
    assert energy_distance(x, x) == pytest.approx(0.0, abs=1e-12)
    assert energy_distance(x, x + 1.0) > energy_distance(x, x + 0.1) > 0


def test_marginal_errors_match_numpy():
    rng = np.random.default_rng(2)
    q = rng.normal([0.0, 1.0], [1.0, 3.0], (1000, 2))
    p = rng.normal([0.5, 1.0], [2.0, 3.0], (1000, 2))
    mean_err, sd_ratio = marginal_errors(torch.tensor(q), torch.tensor(p))
    sd_p = p.std(0, ddof=1)
    assert mean_err == pytest.approx(np.max(np.abs(q.mean(0) - p.mean(0)) / sd_p))
    ratio = q.std(0, ddof=1) / sd_p
    assert sd_ratio == pytest.approx(np.max(np.maximum(ratio, 1 / ratio)))


def test_mode_shares():
    modes = torch.tensor([[-3.0, 0.0], [3.0, 0.0]])
    samples = torch.tensor([[-2.5, 0.1]] * 30 + [[2.0, -1.0]] * 70)
    assert torch.allclose(
        mode_shares(samples, modes), torch.tensor([0.3, 0.7], dtype=torch.float64)
    )
    assert worst_mode_share_error(samples, modes) == pytest.approx(0.4)
