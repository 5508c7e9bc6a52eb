"""posteriordb reference posteriors: draws load, and the Pyro models match direct formulas."""

from pathlib import Path

import numpy as np
import pyro
import pyro.poutine as poutine
import pytest
import torch
from scipy import stats

from pyro_cwm.data.posteriordb import POSTERIORS, load_reference_posterior

REFPOST = Path(__file__).resolve().parents[3] / "shared" / "refpost"
pytestmark = pytest.mark.skipif(not REFPOST.is_dir(), reason="shared/refpost not present")


def site_values(posterior, row):
    """Reference draw ``row`` as {site: value} (inverse of ReferencePosterior.flatten)."""
    values = {}
    for column, value in zip(posterior.columns, row):
        site, _, index = column.partition("[")
        values.setdefault(site, []).append(value)
    return {k: torch.stack(v) if len(v) > 1 else v[0] for k, v in values.items()}


def log_joint(posterior, values):
    trace = poutine.trace(poutine.condition(posterior.model, data=values)).get_trace(
        *posterior.args
    )
    return trace.log_prob_sum().item()


@pytest.mark.parametrize("name", POSTERIORS)
def test_loads_with_finite_log_density_at_reference_draws(name):
    posterior = load_reference_posterior(name, REFPOST)
    assert posterior.draws.shape[1] == len(posterior.columns)
    assert posterior.draws.shape[0] in (10_000, 20_000)
    for row in posterior.draws[:3]:
        assert np.isfinite(log_joint(posterior, site_values(posterior, row)))


def test_ark_matches_a_direct_computation():
    posterior = load_reference_posterior("arK", REFPOST)
    row = posterior.draws[0].double()
    y, order = posterior.args[0].double().numpy(), posterior.args[1]
    alpha, beta, sigma = row[0].item(), row[1:6].numpy(), row[6].item()
    mean = alpha + sum(beta[k] * y[order - k - 1 : len(y) - k - 1] for k in range(order))
    expected = (
        stats.norm(mean, sigma).logpdf(y[order:]).sum()
        + stats.norm(0, 10).logpdf(alpha)
        + stats.norm(0, 10).logpdf(beta).sum()
        + stats.halfcauchy(scale=2.5).logpdf(sigma)
    )
    with torch.no_grad():
        got = log_joint(posterior, site_values(posterior, row.float()))
    assert got == pytest.approx(expected, rel=1e-4)


def test_gauss_mix_reference_is_symmetric_and_the_model_exchangeable():
    posterior = load_reference_posterior("low_dim_gauss_mix", REFPOST)
    index = {c: i for i, c in enumerate(posterior.columns)}
    n = posterior.draws.shape[0] // 2
    first, second = posterior.draws[:n], posterior.draws[n:]
    assert torch.allclose(second[:, index["mu[1]"]], first[:, index["mu[2]"]])
    assert torch.allclose(second[:, index["theta"]], 1 - first[:, index["theta"]])
    a = log_joint(posterior, site_values(posterior, first[0]))
    b = log_joint(posterior, site_values(posterior, second[0]))
    assert a == pytest.approx(b, rel=1e-5)


def test_flatten_orders_site_samples_by_column():
    posterior = load_reference_posterior("eight_schools", REFPOST)
    samples = {
        "theta": torch.arange(16.0).reshape(2, 8),
        "mu": torch.tensor([100.0, 200.0]),
        "tau": torch.tensor([1.0, 2.0]),
    }
    flat = posterior.flatten(samples)
    assert posterior.columns[:2] == ["theta[1]", "theta[2]"]
    assert flat[1, 0] == 8.0 and flat[0, posterior.columns.index("mu")] == 100.0
    pyro.clear_param_store()
