"""FlowGMM: invertible flow, exact log-determinant, normalized class densities, Bayes' rule."""

import numpy as np
import pytest
import torch
from pyro.infer import TraceEnum_ELBO, infer_discrete
from scipy import stats

from inference.flow_gmm import evaluate_flow_gmm, fit_flow_gmm
from pyro_cwm.data.digits import Dequantize
from pyro_cwm.data.toy import two_moons
from pyro_cwm.models import FlowGMM
from pyro_cwm.models.flow_gmm import FLOWS
from tests.helpers import composite_gauss_legendre


def small_flow(dim=2, classes=3, flow="nsf", scale=3.0, seed=0, noise=0.3):
    torch.manual_seed(seed)
    model = FlowGMM(dim, classes, flow=flow, transforms=2, hidden_features=(16,),
                    mean_scale=scale).double()
    with torch.no_grad():  # move away from the identity so the checks see a real flow
        for p in model.flow.parameters():
            p.add_(noise * torch.randn_like(p))
    return model


@pytest.mark.parametrize("flow", sorted(FLOWS))
def test_flow_is_invertible(flow):
    model = small_flow(dim=4, flow=flow)
    x = 2 * torch.randn(50, 4, dtype=torch.float64)
    z, _ = model.latent(x)
    assert torch.allclose(model.transform().inv(z), x, atol=1e-6)


@pytest.mark.parametrize("flow", sorted(FLOWS))
def test_log_determinant_matches_autograd_jacobian(flow):
    model = small_flow(dim=3, flow=flow)
    transform = model.transform()
    for x in 1.5 * torch.randn(5, 3, dtype=torch.float64):
        jacobian = torch.autograd.functional.jacobian(transform, x)
        _, ladj = transform.call_and_ladj(x)
        assert ladj.item() == pytest.approx(torch.linalg.slogdet(jacobian)[1].item(), abs=1e-8)


def test_class_densities_integrate_to_one_on_a_grid():
    # An autoregressive affine flow: smooth enough for quadrature (splines need far more
    # nodes per kink); the class-conditional construction is the same for every flow.
    model = small_flow(dim=2, classes=3, flow="maf", noise=0.1)
    nodes, weights = composite_gauss_legendre(-12.0, 12.0, panels=48, nodes=8)
    grid = torch.cartesian_prod(torch.tensor(nodes), torch.tensor(nodes))
    w = torch.outer(torch.tensor(weights), torch.tensor(weights)).reshape(-1)
    with torch.no_grad():
        for y in range(3):
            labels = torch.full((grid.shape[0],), y)
            density = model.class_distribution(labels).log_prob(grid).exp()
            assert (w * density).sum().item() == pytest.approx(1.0, abs=1e-5)
        marginal = model.log_prob(grid).exp()
    assert (w * marginal).sum().item() == pytest.approx(1.0, abs=1e-5)


def test_predict_proba_is_bayes_rule_by_hand():
    model = small_flow(dim=2, classes=3)
    model.set_class_weights(torch.tensor([0.2, 0.3, 0.5]))
    x = 3 * torch.randn(20, 2, dtype=torch.float64)
    with torch.no_grad():
        z, ladj = model.latent(x)
        proba = model.predict_proba(x)
        joint = model.joint_log_probs(x)
    means = model.means.numpy()
    by_hand = np.stack(
        [np.log(w) + stats.multivariate_normal(means[k]).logpdf(z.numpy()) + ladj.numpy()
         for k, w in enumerate([0.2, 0.3, 0.5])],
        -1,
    )
    assert np.allclose(joint.numpy(), by_hand, atol=1e-10)
    assert torch.allclose(proba.sum(-1), torch.ones(20, dtype=torch.float64))
    expected = np.exp(by_hand - by_hand.max(-1, keepdims=True))
    assert np.allclose(proba.numpy(), expected / expected.sum(-1, keepdims=True), atol=1e-10)
    assert torch.equal(model.predict(x), proba.argmax(-1))


def test_pyro_model_enumerates_or_observes_the_label():
    model = small_flow(dim=2, classes=3)
    x = 2 * torch.randn(10, 2, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    empty_guide = lambda x, y=None: None  # noqa: E731
    with torch.no_grad():
        assert -elbo.loss(model.model, empty_guide, x) == pytest.approx(
            model.log_prob(x).sum().item(), rel=1e-10
        )
        assert -elbo.loss(model.model, empty_guide, x, y) == pytest.approx(
            model.log_prob(x, y).sum().item(), rel=1e-10
        )
        decoded = infer_discrete(model.model, first_available_dim=-2, temperature=0)(x)
    assert torch.equal(decoded, model.predict(x))


def test_state_dict_round_trip(tmp_path):
    model = small_flow(dim=2, classes=3)
    torch.save({"config": model.config(), "state": model.state_dict()}, tmp_path / "m.pt")
    saved = torch.load(tmp_path / "m.pt", weights_only=True)
    again = FlowGMM(**saved["config"]).double()
    again.load_state_dict(saved["state"])
    x = torch.randn(7, 2, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(again.log_prob(x), model.log_prob(x))


def test_training_on_moons_classifies_and_samples_by_class():
    torch.manual_seed(0)
    x, y = two_moons(600, seed=0, return_labels=True)
    model = FlowGMM(2, 2, transforms=2, hidden_features=(32,), mean_scale=4.0)
    history = fit_flow_gmm(model, x[:500], y[:500], epochs=15, lr=3e-3, progress=False,
                           validation=(x[500:], y[500:]))
    assert history["loss"][-1] < history["loss"][0]
    assert evaluate_flow_gmm(model, x[500:], y[500:])["accuracy"] > 0.95
    samples, labels = model.sample(200, 1)
    assert samples.shape == (200, 2) and (labels == 1).all()
    with torch.no_grad():
        assert (model.predict(samples) == 1).float().mean() > 0.95


def test_semi_supervised_training_uses_the_unlabelled_points():
    x, y = two_moons(400, seed=1, return_labels=True)
    model = FlowGMM(2, 2, transforms=1, hidden_features=(16,), mean_scale=4.0)
    history = fit_flow_gmm(model, x[:20], y[:20], x_unlabeled=x[20:], epochs=3,
                           progress=False)
    assert len(history["loss"]) == 3 and np.isfinite(history["loss"]).all()


def test_dequantization_log_det_matches_autograd():
    dequantize = Dequantize()
    v = torch.tensor([[0.0, 5.0, 16.0]], dtype=torch.float64)
    z, log_det = dequantize.with_log_det(v)  # u = 1/2: the map v -> z is elementwise
    derivative = torch.autograd.functional.jacobian(lambda t: dequantize(t), v[0]).diagonal()
    assert log_det.item() == pytest.approx(derivative.log().sum().item(), rel=1e-10)
    assert np.allclose(dequantize.to_pixels(z), v.numpy())


class TestBadInput:
    def test_flow_name(self):
        with pytest.raises(ValueError, match="flow must be one of"):
            FlowGMM(2, 2, flow="glow")

    def test_sizes_and_scale(self):
        with pytest.raises(ValueError, match="num_classes"):
            FlowGMM(2, 0)
        with pytest.raises(ValueError, match="mean_scale"):
            FlowGMM(2, 2, mean_scale=0.0)

    def test_data(self):
        model = small_flow()
        with pytest.raises(ValueError, match=r"shape \(\.\.\., 2\)"):
            model.log_prob(torch.zeros(3, 5, dtype=torch.float64))
        with pytest.raises(ValueError, match="NaN"):
            model.log_prob(torch.tensor([[0.0, float("nan")]], dtype=torch.float64))

    def test_labels(self):
        model = small_flow()
        x = torch.zeros(4, 2, dtype=torch.float64)
        with pytest.raises(ValueError, match="labels must be in"):
            model.log_prob(x, torch.tensor([0, 1, 2, 3]))
        with pytest.raises(ValueError, match="labels must have shape"):
            fit_flow_gmm(model, x, torch.tensor([0, 1]), progress=False)
        with pytest.raises(ValueError, match="x_unlabeled"):
            fit_flow_gmm(model, x, torch.zeros(4), x_unlabeled=torch.zeros(3, 3),
                         progress=False)
