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


FOLDERS = {
    "diamonds": "diamonds-diamonds",
    "nes": "nes2000-nes",
    "hmm_drive_0": "bball_drive_event_0-hmm_drive_0",
    "hmm_example": "hmm_example-hmm_example",
    "garch11": "garch-garch11",
    "blr": "sblrc-blr",
}


def info_marginals(folder):
    """The (mean, sd) table of a folder's info.txt: {column: (mean, sd)}."""
    lines = (REFPOST / folder / "info.txt").read_text().splitlines()
    start = lines.index("reference marginals (mean, sd):") + 1
    table = {}
    for line in lines[start:]:
        if line.strip():
            column, mean, sd = line.split()
            table[column] = (float(mean), float(sd))
    return table


@pytest.mark.parametrize("name", list(FOLDERS))
def test_new_posteriors_load_the_marginals_of_their_info_table(name):
    posterior = load_reference_posterior(name, REFPOST)
    table = info_marginals(FOLDERS[name])
    assert list(table) == posterior.columns
    expected = torch.tensor(list(table.values()), dtype=torch.float64)
    assert torch.allclose(posterior.draws.mean(0), expected[:, 0], rtol=1e-3, atol=1e-6)
    assert torch.allclose(posterior.draws.std(0), expected[:, 1], rtol=1e-3, atol=1e-6)


def data_json(name):
    import json

    return json.loads((REFPOST / FOLDERS[name] / "data.json").read_text())


def test_diamonds_matches_a_direct_computation():
    posterior = load_reference_posterior("diamonds", REFPOST)
    data = data_json("diamonds")
    x = np.asarray(data["X"])[:, 1:]
    xc = x - x.mean(0)
    y = np.asarray(data["Y"])
    for row in posterior.draws[:2]:
        b, intercept, sigma = row[:24].numpy(), row[24].item(), row[25].item()
        expected = (
            stats.norm(intercept + xc @ b, sigma).logpdf(y).sum()
            + stats.norm(0, 1).logpdf(b).sum()
            + stats.t(3, loc=8, scale=10).logpdf(intercept)
            + np.log(2) + stats.t(3, loc=0, scale=10).logpdf(sigma)
        )
        assert log_joint(posterior, site_values(posterior, row)) == pytest.approx(
            expected, rel=1e-10
        )


def test_nes_matches_a_direct_computation():
    posterior = load_reference_posterior("nes", REFPOST)
    d = {k: np.asarray(v, dtype=float) for k, v in data_json("nes").items() if k != "N"}
    for row in posterior.draws[:2]:
        beta, sigma = row[:9].numpy(), row[9].item()
        mean = (
            beta[0] + beta[1] * d["real_ideo"] + beta[2] * d["race_adj"]
            + beta[3] * (d["age_discrete"] == 2) + beta[4] * (d["age_discrete"] == 3)
            + beta[5] * (d["age_discrete"] == 4) + beta[6] * d["educ1"]
            + beta[7] * d["gender"] + beta[8] * d["income"]
        )
        expected = stats.norm(mean, sigma).logpdf(d["partyid7"]).sum()  # flat priors
        assert log_joint(posterior, site_values(posterior, row)) == pytest.approx(
            expected, rel=1e-10
        )


def stan_forward(emission, theta):
    """Stan's forward algorithm: weight 1 per start state; ``emission`` (T, K) log-densities,
    ``theta`` (K, K) rows of the transition matrix."""
    gamma = emission[0]
    for t in range(1, len(emission)):
        gamma = np.array(
            [np.logaddexp.reduce(gamma + np.log(theta[:, k])) for k in range(len(gamma))]
        ) + emission[t]
    return np.logaddexp.reduce(gamma)


def stan_hmm_drive_log_density(row, data):
    """info.txt's formula: priors plus Stan's forward algorithm (weight 1 per start state)."""
    theta = np.array([[row[0], row[1]], [row[2], row[3]]])
    phi, lam = row[4:6], row[6:8]
    alpha = np.asarray(data["alpha"], dtype=float)
    u, v = np.asarray(data["u"]), np.asarray(data["v"])
    emission = stats.expon(scale=1 / phi).logpdf(u[:, None]) + stats.expon(
        scale=1 / lam
    ).logpdf(v[:, None])  # (T, K)
    prior = (
        stats.dirichlet(alpha[0]).logpdf(theta[0])
        + stats.dirichlet(alpha[1]).logpdf(theta[1])
        + stats.norm([0, 3], 1).logpdf(phi).sum()
        + stats.norm([0, 3], 1).logpdf(lam).sum()
    )
    return prior + stan_forward(emission, theta)


def test_hmm_drive_matches_stans_forward_algorithm():
    posterior = load_reference_posterior("hmm_drive_0", REFPOST)
    data = data_json("hmm_drive_0")
    for row in posterior.draws[:2]:
        # Dirichlet draws sum to one only to float precision: renormalize for both.
        row = row.clone()
        row[:2], row[2:4] = row[:2] / row[:2].sum(), row[2:4] / row[2:4].sum()
        expected = stan_hmm_drive_log_density(row.numpy(), data)
        got = log_joint(posterior, site_values(posterior, row))
        assert got == pytest.approx(expected, rel=1e-10)


def test_hmm_example_matches_stans_forward_algorithm():
    posterior = load_reference_posterior("hmm_example", REFPOST)
    y = np.asarray(data_json("hmm_example")["y"])
    for row in posterior.draws[:2]:
        row = row.clone()
        row[:2], row[2:4] = row[:2] / row[:2].sum(), row[2:4] / row[2:4].sum()
        theta, mu = row[:4].numpy().reshape(2, 2), row[4:6].numpy()
        # Uniform simplex priors: Dirichlet(1, 1) has density 1 on theta_k[1].
        expected = (
            stats.norm([3, 10], 1).logpdf(mu).sum()
            + stan_forward(stats.norm(mu, 1).logpdf(y[:, None]), theta)
        )
        assert log_joint(posterior, site_values(posterior, row)) == pytest.approx(
            expected, rel=1e-10
        )


def test_garch11_matches_the_recursion_with_the_jacobian_of_beta1():
    posterior = load_reference_posterior("garch11", REFPOST)
    data = data_json("garch11")
    y = np.asarray(data["y"])
    for row in posterior.draws[:2]:
        mu, alpha0, alpha1, beta1 = row.numpy()
        sigma = [data["sigma1"]]
        for t in range(1, len(y)):
            sigma.append(np.sqrt(alpha0 + alpha1 * (y[t - 1] - mu) ** 2 + beta1 * sigma[-1] ** 2))
        # Flat priors on the constrained values; the model samples beta1 / (1 - alpha1).
        expected = stats.norm(mu, sigma).logpdf(y).sum() + np.log1p(-alpha1)
        values = site_values(posterior, row)
        values["beta1_fraction"] = values.pop("beta1") / (1 - values["alpha1"])
        assert log_joint(posterior, values) == pytest.approx(expected, rel=1e-10)


def test_blr_matches_a_direct_computation():
    posterior = load_reference_posterior("blr", REFPOST)
    data = data_json("blr")
    x, y = np.asarray(data["X"]), np.asarray(data["y"])
    for row in posterior.draws[:2]:
        beta, sigma = row[:5].numpy(), row[5].item()
        expected = (
            stats.norm(x @ beta, sigma).logpdf(y).sum()
            + stats.norm(0, 10).logpdf(beta).sum()
            + stats.halfnorm(scale=10).logpdf(sigma)
        )
        assert log_joint(posterior, site_values(posterior, row)) == pytest.approx(
            expected, rel=1e-10
        )
