"""The mixture density network: densities against scipy, samples against densities, the
variance floor, the order of the noise parameters, bad input, the Pyro likelihood, the CWM
head and a short fit of the seed's inverse-sine problem."""

import math

import numpy as np
import pyro
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoNormal
from scipy import stats
from scipy.special import log_softmax, logsumexp

from inference import fit_density
from pyro_cwm import ClassifierWeightedMixture, GaussianMixture
from pyro_cwm.data.toy import inverse_sine
from pyro_cwm.models import MixtureDensityNetwork
from pyro_cwm.models.mdn import NOISE_TYPES
from tests.helpers import binned_goodness_of_fit

DTYPE = torch.float64
LEARNED = [t for t in NOISE_TYPES if t != "fixed"]


def random_mdn(input_dim, output_dim, k, noise_type, seed=0, scale=0.5, **options):
    """An MDN with every weight perturbed, so weights, means and scales vary with x."""
    torch.manual_seed(seed)
    fixed = 0.7 if noise_type == "fixed" else None
    mdn = MixtureDensityNetwork(
        input_dim,
        output_dim,
        k,
        hidden_dims=(8,),
        noise_type=noise_type,
        fixed_scale=fixed,
        **options,
    ).to(DTYPE)
    with torch.no_grad():
        for p in mdn.parameters():
            p.add_(scale * torch.randn_like(p))
    return mdn


def reference_mixture(mdn, x):
    """(log weights, means, covariances) per row of x, from the head's raw outputs and the
    documented parameterization, with numpy only (independent of GaussianMixture)."""
    with torch.no_grad():
        out = mdn.head(mdn.trunk(x)).numpy()
    k, d, s2 = mdn.num_components, mdn.output_dim, mdn.min_scale**2
    logw = log_softmax(out[:, :k], axis=-1)
    mu = out[:, k : k + k * d].reshape(-1, k, d)
    raw = out[:, k + k * d :]
    n = x.shape[0]
    cov = np.zeros((n, k, d, d))
    for i in range(n):
        for j in range(k):
            if mdn.noise_type == "full":
                m = d * (d + 1) // 2
                entries = raw[i, j * m : (j + 1) * m]
                L = np.zeros((d, d))
                r, c = np.tril_indices(d)
                L[r, c] = entries
                L[np.diag_indices(d)] = np.exp(np.diag(L))
                cov[i, j] = L @ L.T + s2 * np.eye(d)
            elif mdn.noise_type == "diagonal":
                cov[i, j] = np.diag(np.exp(2 * raw[i, j * d : (j + 1) * d]) + s2)
            elif mdn.noise_type == "isotropic":
                cov[i, j] = (np.exp(2 * raw[i, j]) + s2) * np.eye(d)
            elif mdn.noise_type == "isotropic_across_components":
                cov[i, j] = (np.exp(2 * raw[i, 0]) + s2) * np.eye(d)
            else:
                cov[i, j] = mdn.fixed_scale**2 * np.eye(d)
    return logw, mu, cov


@pytest.mark.parametrize("output_dim", [1, 3])
@pytest.mark.parametrize("noise_type", NOISE_TYPES)
def test_log_prob_is_the_mixture_density_computed_with_scipy(noise_type, output_dim):
    mdn = random_mdn(2, output_dim, 3, noise_type, min_scale=0.05)
    x = torch.randn(7, 2, dtype=DTYPE)
    y = torch.randn(7, output_dim, dtype=DTYPE)
    ours = mdn.log_prob(y, x).detach().numpy()
    logw, mu, cov = reference_mixture(mdn, x)
    expected = [
        logsumexp(
            [
                logw[i, j] + stats.multivariate_normal(mu[i, j], cov[i, j]).logpdf(y[i].numpy())
                for j in range(3)
            ]
        )
        for i in range(7)
    ]
    np.testing.assert_allclose(ours, expected, rtol=1e-10, atol=1e-10)
    assert isinstance(mdn(x), GaussianMixture)


@pytest.mark.parametrize("noise_type", ["isotropic", "diagonal"])
def test_each_component_gets_its_own_sigma_in_every_dimension(noise_type):
    # The seed's isotropic type repeated the K sigmas in the wrong order for d > 1, mixing
    # components and dimensions. Give every (component, dimension) a distinct sigma and
    # check where each one lands.
    k, d = 4, 3
    mdn = MixtureDensityNetwork(1, d, k, hidden_dims=(), noise_type=noise_type, min_scale=0.0)
    mdn = mdn.to(DTYPE)
    if noise_type == "isotropic":
        sigma = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=DTYPE)  # (K,)
        expected = torch.stack([s**2 * torch.eye(d, dtype=DTYPE) for s in sigma])
        raw = sigma.log()
    else:
        sigma = torch.arange(1, k * d + 1, dtype=DTYPE).reshape(k, d)  # (K, d)
        expected = torch.diag_embed(sigma**2)
        raw = sigma.log().reshape(-1)
    with torch.no_grad():
        mdn.head.weight.zero_()
        mdn.head.bias.zero_()
        mdn.head.bias[k + k * d :] = raw
    x = torch.randn(5, 1, dtype=DTYPE)
    dist = mdn(x)
    cov = dist.component_covariances
    torch.testing.assert_close(cov, expected.expand(5, k, d, d))
    # And the density uses them: the log-density of each component against scipy.
    y = torch.randn(5, d, dtype=DTYPE)
    comp = dist.component_log_probs(y)
    for j in range(k):
        ref = stats.multivariate_normal(np.zeros(d), expected[j].numpy()).logpdf(y.numpy())
        np.testing.assert_allclose(comp[:, j].detach().numpy(), ref, rtol=1e-12)


@pytest.mark.parametrize("noise_type", NOISE_TYPES)
def test_samples_follow_the_density_1d(noise_type):
    mdn = random_mdn(2, 1, 3, noise_type, seed=1)
    x = torch.randn(3, 2, dtype=DTYPE)
    samples = mdn.sample(x, (4000,))
    assert samples.shape == (4000, 3, 1)
    for i in range(3):
        pvalue = binned_goodness_of_fit(mdn(x[i]), samples[:, i], low=-8, high=8, bins=16)
        assert pvalue > 1e-3, (i, pvalue)


@pytest.mark.parametrize("noise_type", ["full", "diagonal", "isotropic"])
def test_samples_follow_the_density_2d(noise_type):
    mdn = random_mdn(1, 2, 3, noise_type, seed=2)
    x = torch.tensor([0.3], dtype=DTYPE)
    samples = mdn.sample(x, (4000,))
    pvalue = binned_goodness_of_fit(mdn(x), samples, low=-6, high=6, bins=6)
    assert pvalue > 1e-3


def test_batch_shapes():
    mdn = random_mdn(2, 3, 4, "full")
    x = torch.randn(2, 5, 2, dtype=DTYPE)
    dist = mdn(x)
    assert dist.batch_shape == (2, 5) and dist.event_shape == (3,)
    assert mdn.sample(x).shape == (2, 5, 3)
    assert mdn.sample(x, (4, 6)).shape == (4, 6, 2, 5, 3)
    # y broadcasts against x's leading dims, both ways.
    assert mdn.log_prob(torch.randn(5, 3, dtype=DTYPE), x).shape == (2, 5)
    assert mdn.log_prob(torch.randn(7, 1, 3, dtype=DTYPE), x[0]).shape == (7, 5)
    # A single x (no batch dim) gives a scalar-batch distribution.
    assert mdn(x[0, 0]).batch_shape == ()
    # The row-wise log-density equals the batched one.
    y = torch.randn(2, 5, 3, dtype=DTYPE)
    flat = mdn.log_prob(y.reshape(10, 3), x.reshape(10, 2)).reshape(2, 5)
    torch.testing.assert_close(mdn.log_prob(y, x), flat)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("noise_type", LEARNED)
def test_variance_floor_holds_for_extreme_inputs(noise_type, dtype):
    floor = 0.05
    mdn = random_mdn(1, 3, 3, noise_type, scale=3.0, min_scale=floor).to(dtype)
    x = torch.tensor([[-1e6], [-1e3], [0.0], [1e3], [1e6]], dtype=dtype)
    with torch.no_grad():
        cov = mdn(x).component_covariances.double()
        assert torch.isfinite(cov).all()
        assert torch.isfinite(mdn.log_prob(torch.zeros(5, 3, dtype=dtype), x)).all()
    # Every variance (the diagonal), and for moderate inputs every eigenvalue, is floored;
    # for the full type at x = 1e6 the eigenvalues span more than the dtype can resolve.
    assert cov.diagonal(dim1=-2, dim2=-1).min() >= floor**2 * (1 - 1e-4)
    moderate = cov if noise_type != "full" else mdn(x[2:3]).component_covariances.double()
    assert torch.linalg.eigvalsh(moderate.detach()).min() >= floor**2 * (1 - 1e-3)
    # Log-scales driven to -infinity put every variance exactly on the floor.
    with torch.no_grad():
        mdn.head.weight.zero_()
        mdn.head.bias[3 + 9 :] = -1e4  # the scale entries (and L's off-diagonal)
        if noise_type == "full":
            mdn.head.bias[3 + 9 :] = 0.0
            diagonal_of_l = [3 + 9 + 6 * j + i for j in range(3) for i in (0, 2, 5)]
            mdn.head.bias[diagonal_of_l] = -1e4
        cov = mdn(x).component_covariances
    expected = floor**2 * torch.eye(3, dtype=dtype).expand_as(cov)
    torch.testing.assert_close(cov, expected, rtol=1e-4, atol=1e-12)


def test_full_covariance_eigenvalues_stay_above_the_floor():
    # Nearly singular L L^T (collinear rows) with large entries: the floor lifts the small
    # eigenvalue to at least s^2.
    mdn = MixtureDensityNetwork(1, 2, 1, hidden_dims=(), noise_type="full", min_scale=0.1)
    mdn = mdn.to(DTYPE)
    with torch.no_grad():
        mdn.head.weight.zero_()
        mdn.head.bias[3:] = torch.tensor([math.log(30.0), 30.0, -20.0], dtype=DTYPE)
    cov = mdn(torch.zeros(1, dtype=DTYPE)).component_covariances[0]
    tril = torch.tensor([[30.0, 0.0], [30.0, math.exp(-20.0)]], dtype=DTYPE)
    torch.testing.assert_close(cov, tril @ tril.T + 0.01 * torch.eye(2, dtype=DTYPE))
    assert torch.linalg.eigvalsh(cov).min() >= 0.01 * (1 - 1e-6)


def test_fixed_noise_is_not_learned():
    mdn = MixtureDensityNetwork(1, 2, 3, noise_type="fixed", fixed_scale=0.25)
    cov = mdn(torch.randn(4, 1)).component_covariances
    torch.testing.assert_close(cov, 0.0625 * torch.eye(2).expand(4, 3, 2, 2))
    assert mdn.head.out_features == 3 + 3 * 2  # logits and means only


def test_bad_input_gets_clear_errors():
    mdn = MixtureDensityNetwork(1, 2, 3)
    x, y = torch.randn(5, 1), torch.randn(5, 2)
    with pytest.raises(ValueError, match="y and x"):
        mdn.log_prob(torch.randn(4, 2), x)
    with pytest.raises(ValueError, match="input_dim=1"):
        mdn(torch.randn(5, 2))
    with pytest.raises(ValueError, match="output_dim=2"):
        mdn.log_prob(torch.randn(5, 3), x)
    bad_x = x.clone()
    bad_x[2, 0] = math.nan
    with pytest.raises(ValueError, match="x contains NaN"):
        mdn.log_prob(y, bad_x)
    bad_y = y.clone()
    bad_y[1, 1] = math.inf
    with pytest.raises(ValueError, match="y contains NaN or inf"):
        mdn.log_prob(bad_y, x)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        mdn(np.zeros((5, 1)))
    with pytest.raises(ValueError, match="num_components must be >= 1"):
        MixtureDensityNetwork(1, 2, 0)
    with pytest.raises(ValueError, match="input_dim must be >= 1"):
        MixtureDensityNetwork(0, 2, 3)
    with pytest.raises(ValueError, match="noise_type must be one of"):
        MixtureDensityNetwork(1, 2, 3, noise_type="spherical")
    with pytest.raises(ValueError, match="needs fixed_scale"):
        MixtureDensityNetwork(1, 2, 3, noise_type="fixed")
    with pytest.raises(ValueError, match="fixed_scale must be a finite number > 0"):
        MixtureDensityNetwork(1, 2, 3, noise_type="fixed", fixed_scale=-1.0)
    with pytest.raises(ValueError, match="only used with noise_type='fixed'"):
        MixtureDensityNetwork(1, 2, 3, fixed_scale=1.0)
    with pytest.raises(ValueError, match="min_scale must be a finite number >= 0"):
        MixtureDensityNetwork(1, 2, 3, min_scale=-0.1)
    with pytest.raises(ValueError, match="head must be one of"):
        MixtureDensityNetwork(1, 2, 3, head="flow")
    with pytest.raises(ValueError, match="cwm head"):
        MixtureDensityNetwork(1, 2, 3, head="cwm", noise_type="isotropic")
    with pytest.raises(ValueError, match="y must have shape"):
        mdn.model(x, torch.randn(1, 2))
    # fit_density checks the data against the module's widths.
    with pytest.raises(ValueError, match="context has 4 rows but data has 5"):
        fit_density(mdn, y, torch.randn(4, 1), progress=False)
    with pytest.raises(ValueError, match="data must have 2 columns"):
        fit_density(mdn, torch.randn(5, 3), x, progress=False)


def test_as_likelihood_of_a_pyro_model():
    mdn = random_mdn(1, 2, 3, "full")
    x, y = torch.randn(6, 1, dtype=DTYPE), torch.randn(6, 2, dtype=DTYPE)
    trace = pyro.poutine.trace(mdn.model).get_trace(x, y)
    trace.compute_log_prob()
    assert trace.nodes["y"]["is_observed"]
    torch.testing.assert_close(trace.nodes["y"]["log_prob"], mdn.log_prob(y, x))


def test_bayesian_mdn_fits_by_svi():
    x, y = inverse_sine(64, seed=0)
    mdn = MixtureDensityNetwork(1, 1, 3, hidden_dims=(8,)).standardize_inputs(x)
    mdn.set_weight_prior(1.0)
    assert not list(mdn.parameters())  # every weight is now a random variable
    guide = AutoNormal(mdn.model, init_scale=0.05)
    svi = SVI(mdn.model, guide, pyro.optim.Adam({"lr": 0.03}), Trace_ELBO())
    losses = [svi.step(x, y) for _ in range(150)]
    assert set(guide.median()) == {"trunk.0.weight", "trunk.0.bias", "head.weight", "head.bias"}
    assert np.mean(losses[-20:]) < np.mean(losses[:10]) - 50
    predictive = Predictive(mdn.model, guide=guide, num_samples=10, return_sites=["y"])
    assert predictive(x)["y"].shape == (10, 64, 1)

    # The data are likelier under weights from the guide than under weights from the prior.
    def mean_log_lik(sample_weights):
        total = 0.0
        for _ in range(10):
            trace = pyro.poutine.trace(sample_weights(mdn.model)).get_trace(x, y)
            trace.compute_log_prob()
            total += trace.nodes["y"]["log_prob_sum"].item() / 10
        return total

    posterior = mean_log_lik(
        lambda model: pyro.poutine.replay(model, pyro.poutine.trace(guide).get_trace(x, y))
    )
    prior = mean_log_lik(lambda model: model)
    assert posterior > prior + 50
    with pytest.raises(ValueError, match="already have a prior"):
        mdn.set_weight_prior()


def test_cwm_head_is_the_conditional_cwm_on_the_trunk_features():
    mdn = MixtureDensityNetwork(2, 2, 3, hidden_dims=(), head="cwm")
    x, y = torch.randn(5, 2), torch.randn(5, 2)
    dist = mdn(x)
    assert isinstance(dist, ClassifierWeightedMixture)
    assert dist.batch_shape == (5,) and dist.event_shape == (2,)
    # Without a trunk the MDN is exactly the conditional CWM with context x.
    torch.testing.assert_close(mdn.log_prob(y, x), mdn.head(x).log_prob(y))
    assert mdn.sample(x, (3,)).shape == (3, 5, 2)
    assert mdn.head.map == "location_scale"
    full = MixtureDensityNetwork(2, 2, 3, head="cwm", noise_type="full")
    assert full.head.map == "affine" and full.head.context_dim == 64
    with pytest.raises(ValueError, match="head='gaussian'"):
        full.set_weight_prior()


def test_cwm_head_density_integrates_to_one():
    mdn = MixtureDensityNetwork(1, 1, 3, hidden_dims=(8,), head="cwm").to(DTYPE)
    grid = torch.linspace(-15, 15, 6001, dtype=DTYPE).unsqueeze(-1)
    for x in (-1.0, 0.5):
        dens = mdn.log_prob(grid, torch.tensor([x], dtype=DTYPE)).exp()
        assert torch.trapezoid(dens, grid[:, 0]).item() == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("head", ["gaussian", "cwm"])
def test_short_fit_on_the_inverse_sine_problem(head):
    x, y = inverse_sine(512, seed=0)
    x_test, y_test = inverse_sine(2000, uniform=True, seed=1)
    torch.manual_seed(0)
    mdn = MixtureDensityNetwork(1, 1, 3, hidden_dims=(32,), head=head)
    mdn.standardize_inputs(x)
    with torch.no_grad():
        before = -mdn.log_prob(y_test, x_test).mean().item()
    history = fit_density(
        mdn, y, x, epochs=60, batch_size=64, lr=0.01, validation=0.0, progress=False
    )
    with torch.no_grad():
        after = -mdn.log_prob(y_test, x_test).mean().item()
    assert len(history["train_nll"]) == 60
    # Ignoring x gives log 2 = 0.69; one Gaussian per x cannot go much below 0.2; the
    # three-mode fit reaches about -1.15 with long training.
    assert before > 0.6
    assert after < -0.8


def test_state_dict_round_trip(tmp_path):
    mdn = random_mdn(2, 3, 2, "isotropic")
    mdn.standardize_inputs(torch.randn(10, 2, dtype=DTYPE) * 3 + 1)
    torch.save(mdn.state_dict(), tmp_path / "mdn.pt")
    copy = MixtureDensityNetwork(**mdn.config()).to(DTYPE)
    copy.load_state_dict(torch.load(tmp_path / "mdn.pt", weights_only=True))
    x, y = torch.randn(4, 2, dtype=DTYPE), torch.randn(4, 3, dtype=DTYPE)
    torch.testing.assert_close(copy.log_prob(y, x), mdn.log_prob(y, x))
