"""The SVI loop: history, early stopping, NaN stop, checkpoint and resume."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from inference import CWMELBO, fit_svi
from pyro_cwm.data.posteriors import EIGHT_SCHOOLS_SIGMA as SIGMA
from pyro_cwm.data.posteriors import EIGHT_SCHOOLS_Y as Y
from pyro_cwm.data.posteriors import eight_schools
from pyro_cwm.guides import AutoCWM


def gaussian_model(y):
    loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    with pyro.plate("data", y.shape[0]):
        pyro.sample("obs", dist.Normal(loc, 1.0), obs=y)


def test_fits_a_conjugate_posterior():
    y = torch.randn(20) + 3.0
    guide = AutoCWM(gaussian_model, num_components=2)
    history = fit_svi(
        gaussian_model, guide, y, num_steps=600, progress=False, loss=CWMELBO(num_particles=8)
    )
    assert len(history["loss"]) == history["steps"] == 600
    # Known posterior: N(sum(y) / (n + 1/100), 1 / (n + 1/100)).
    precision = 20 + 1 / 100.0
    samples = guide.get_posterior().sample((20000,))[:, 0]
    assert samples.mean().item() == pytest.approx(y.sum().item() / precision, abs=0.03)
    assert samples.std().item() == pytest.approx(precision**-0.5, rel=0.1)


def test_early_stopping_on_the_smoothed_loss():
    y = torch.randn(20)
    guide = AutoCWM(gaussian_model, num_components=1)
    history = fit_svi(gaussian_model, guide, y, num_steps=5000, patience=50, progress=False)
    assert history["stopped_early"] and history["steps"] < 5000
    assert history["steps"] - 1 - history["best_step"] == 50


class Interrupted(Exception):
    pass


def test_resume_from_checkpoint_continues_the_same_run(tmp_path):
    # The warm-up ends at step 15, after the interruption at step 10: its counter resumes
    # too, and so does the default step-size schedule.
    class Interrupting(CWMELBO):
        def __init__(self, after):
            super().__init__(classifier_warmup=15)
            self.after = after

        def loss_and_grads(self, *args, **kwargs):
            if self.step == self.after:
                raise Interrupted
            return super().loss_and_grads(*args, **kwargs)

    def run(after=None, **options):
        guide = AutoCWM(eight_schools, num_components=2)
        loss = Interrupting(after) if after else CWMELBO(classifier_warmup=15)
        return fit_svi(
            eight_schools, guide, Y, SIGMA, num_steps=20, progress=False, loss=loss, **options
        )

    pyro.set_rng_seed(0)
    run()
    straight = {k: v.detach().clone() for k, v in pyro.get_param_store().named_parameters()}

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    path = tmp_path / "svi.pt"
    with pytest.raises(Interrupted):
        run(after=10, checkpoint=path, checkpoint_every=5)
    pyro.clear_param_store()
    pyro.set_rng_seed(123)  # the checkpoint restores the RNG state
    history = run(checkpoint=path)
    assert history["steps"] == 20 and len(history["loss"]) == 20
    resumed = dict(pyro.get_param_store().named_parameters())
    for name, value in straight.items():
        assert torch.allclose(resumed[name], value, atol=1e-6), name


def test_default_step_size_is_constant_then_decays_to_a_tenth(tmp_path):
    from inference.svi import default_step_size

    sizes = [default_step_size(step, 100) for step in range(100)]
    assert sizes[:50] == [0.01] * 50 and math.isclose(sizes[-1], 1e-3, rel_tol=1e-12)
    assert all(a > b for a, b in zip(sizes[50:], sizes[51:]))


def test_default_step_size_ends_at_a_tenth_and_a_longer_run_decays_to_the_same(tmp_path):
    y = torch.randn(20)
    path = tmp_path / "svi.pt"
    guide = AutoCWM(gaussian_model, num_components=1)
    fit_svi(gaussian_model, guide, y, num_steps=30, progress=False, checkpoint=path)
    state = torch.load(path, weights_only=False)["optim"]
    lrs = [group["lr"] for s in state.values() for group in s["param_groups"]]
    assert lrs and all(math.isclose(lr, 1e-3, rel_tol=1e-9) for lr in lrs)
    # Training extended to 60 steps: its schedule ends at the same step size.
    fit_svi(gaussian_model, guide, y, num_steps=60, progress=False, checkpoint=path)
    state = torch.load(path, weights_only=False)["optim"]
    lrs = [group["lr"] for s in state.values() for group in s["param_groups"]]
    assert all(math.isclose(lr, 1e-3, rel_tol=1e-9) for lr in lrs)


def test_the_best_smoothed_parameters_are_restored():
    class Drifting(CWMELBO):
        """A loss that gets worse after step 50: the last parameters are not the best."""

        def loss_and_grads(self, model, guide, *args, **kwargs):
            value = super().loss_and_grads(model, guide, *args, **kwargs)
            return value + max(0, self.step - 50) * 10.0

    y = torch.randn(20)
    guide = AutoCWM(gaussian_model, num_components=1)
    pyro.set_rng_seed(0)
    snapshots = {}

    class Recorder(pyro.optim.PyroOptim):
        def __call__(self, params, *args, **kwargs):
            super().__call__(params, *args, **kwargs)
            snapshots[len(snapshots)] = {
                n: p.detach().clone() for n, p in pyro.get_param_store().named_parameters()
            }

    history = fit_svi(
        gaussian_model, guide, y, num_steps=80, progress=False, loss=Drifting(),
        optim=Recorder(torch.optim.Adam, {"lr": 0.01}),
        keep_best=True,
    )
    # Candidates start once the moving average has 20 terms.
    assert history["restored_best"] and 20 <= history["best_step"] <= 55
    smoothed = history["smoothed_loss"]
    assert history["best_smoothed_loss"] == min(smoothed[20:])
    for name, value in pyro.get_param_store().named_parameters():
        assert torch.equal(value.detach(), snapshots[history["best_step"]][name])
    # By default the last parameters are kept.
    history = fit_svi(gaussian_model, guide, y, num_steps=80, progress=False, loss=Drifting())
    assert not history["restored_best"]


def test_non_finite_loss_stops_and_keeps_the_last_finite_parameters():
    class Poisoned(CWMELBO):
        calls = 0

        def loss_and_grads(self, model, guide, *args, **kwargs):
            Poisoned.calls += 1
            value = super().loss_and_grads(model, guide, *args, **kwargs)
            return math.nan if Poisoned.calls == 5 else value

    guide = AutoCWM(eight_schools, num_components=2)
    snapshots = []

    class Recorder(pyro.optim.PyroOptim):
        def __call__(self, params, *args, **kwargs):
            super().__call__(params, *args, **kwargs)
            snapshots.append(
                {k: v.detach().clone() for k, v in pyro.get_param_store().named_parameters()}
            )

    with pytest.raises(FloatingPointError, match="last finite step"):
        fit_svi(
            eight_schools,
            guide,
            Y,
            SIGMA,
            loss=Poisoned(),
            optim=Recorder(torch.optim.Adam, {"lr": 0.01}),
            num_steps=10,
            progress=False,
        )
    assert len(snapshots) == 4
    for name, value in pyro.get_param_store().named_parameters():
        assert torch.isfinite(value).all()
        assert torch.equal(value.detach(), snapshots[-1][name])


def test_bad_options():
    with pytest.raises(ValueError, match="num_steps"):
        fit_svi(gaussian_model, AutoCWM(gaussian_model), torch.zeros(3), num_steps=0)
    with pytest.raises(ValueError, match="smoothing"):
        fit_svi(gaussian_model, AutoCWM(gaussian_model), torch.zeros(3), smoothing=1.0)
    with pytest.raises(ValueError, match="average_tail"):
        fit_svi(gaussian_model, AutoCWM(gaussian_model), torch.zeros(3), average_tail=1.0)


def test_tail_averaging_ends_with_the_mean_of_the_last_iterates():
    # With a constant step the first n steps of a run are a run of n steps: the average of
    # the last 5 of 10 steps is the mean of the ends of runs of 6..10 steps.
    y = torch.randn(20) + 1.0

    def run(num_steps, **options):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        guide = AutoCWM(gaussian_model, num_components=2)
        optim = pyro.optim.Adam({"lr": 0.05})
        history = fit_svi(
            gaussian_model, guide, y, num_steps=num_steps, optim=optim, progress=False, **options
        )
        params = {k: v.detach().clone() for k, v in pyro.get_param_store().named_parameters()}
        return history, params

    ends = [run(n)[1] for n in range(6, 11)]
    history, averaged = run(10, average_tail=0.5)
    assert history["averaged_steps"] == 5
    for name, value in averaged.items():
        expected = torch.stack([end[name] for end in ends]).mean(0)
        assert torch.allclose(value, expected, atol=1e-6), name


@pytest.mark.cuda
def test_runs_on_cuda():
    guide = AutoCWM(eight_schools, num_components=2)
    fit_svi(eight_schools, guide, Y, SIGMA, num_steps=5, device="cuda", progress=False)
    assert guide.cwm.reference_loc.is_cuda


def test_a_learning_rate_schedule_is_stepped_once_per_step():
    y = torch.randn(20)
    guide = AutoCWM(gaussian_model, num_components=1)
    optim = pyro.optim.LambdaLR(
        {"optimizer": torch.optim.Adam, "optim_args": {"lr": 0.01}, "lr_lambda": lambda s: 0.5**s}
    )
    fit_svi(gaussian_model, guide, y, num_steps=4, progress=False, optim=optim)
    schedulers = list(optim.optim_objs.values())
    assert schedulers and all(s.last_epoch == 4 for s in schedulers)
    assert all(s.optimizer.param_groups[0]["lr"] == 0.01 * 0.5**4 for s in schedulers)


@pytest.mark.parametrize(
    "map, options, particles",
    [("location_scale", None, 1), ("flow", {"flow": "maf"}, 4), ("flow", {"flow": "iaf"}, 32)],
)
def test_cwmelbo_draws_more_for_richer_maps_and_most_for_a_shared_flow(map, options, particles):
    # Path gradient: one draw suffices for location-scale maps, four for a flow per
    # component; the shared flow trains with the full gradient, whose variance stays.
    pyro.set_rng_seed(0)
    guide = AutoCWM(eight_schools, num_components=2, map=map, map_options=options)
    values, log_w = CWMELBO().elbo_terms(eight_schools, guide, Y, SIGMA)
    assert values.shape == (particles,) and log_w.shape == (particles, 2)
    values, _ = CWMELBO(num_particles=3).elbo_terms(eight_schools, guide, Y, SIGMA)
    assert values.shape == (3,)
