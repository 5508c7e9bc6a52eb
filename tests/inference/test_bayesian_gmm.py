"""Fitting the Bayesian GMM: NUTS, SVI and MAP-EM recover a 3-cluster posterior; labels."""

import numpy as np
import pytest
import torch
from pyro.distributions.transforms import biject_to

from inference.bayesian_gmm import (
    bayesian_gmm_init,
    enumerated_responsibilities,
    fit_bayesian_gmm_map_em,
    fit_bayesian_gmm_svi,
    infer_assignments,
    posterior_responsibilities,
    sample_bayesian_gmm_nuts,
)
from inference.labels import align_labels
from pyro_cwm.models import BayesianGMM

DTYPE = torch.float64
CENTERS = torch.tensor([[-4.0, 0.0], [4.0, 0.0], [0.0, 5.0]], dtype=DTYPE)
SD = 0.7
#: A 3-cycle: component k of the permuted start is component CYCLE[k] of the first start.
CYCLE = torch.tensor([1, 2, 0])


def _separated(n=150, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    noise = SD * torch.randn(n, 2, generator=generator, dtype=DTYPE)
    return CENTERS[labels] + noise, labels


def _overlapping(n=120, seed=1):
    generator = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[-1.5, 0.0], [1.5, 0.0], [0.0, 1.5]], dtype=DTYPE)
    mixing = torch.tensor([[1.0, 0.3], [0.0, 0.8]], dtype=DTYPE)
    noise = torch.randn(n, 2, generator=generator, dtype=DTYPE) @ mixing
    return centers[torch.arange(n) % 3] + noise


def _match_to_truth(locs):
    """Permutation perm with locs[perm[k]] closest to CENTERS[k]."""
    return torch.cdist(CENTERS, locs).argmin(-1)


def _assert_recovers(params, tol_loc=0.3, tol_scale=0.2, tol_weight=0.08):
    perm = _match_to_truth(params["locs"])
    assert sorted(perm.tolist()) == [0, 1, 2], "two components on one cluster"
    torch.testing.assert_close(params["locs"][perm], CENTERS, atol=tol_loc, rtol=0)
    torch.testing.assert_close(
        params["scales"][perm], torch.full((3, 2), SD, dtype=DTYPE), atol=tol_scale, rtol=0
    )
    torch.testing.assert_close(
        params["weights"][perm], torch.full((3,), 1 / 3, dtype=DTYPE), atol=tol_weight, rtol=0
    )


@pytest.fixture(scope="module")
def nuts_run():
    """Two short NUTS chains on the separated data; the second starts from the first's
    start with its labels cycled, so the two chains sit in different label permutations."""
    data, _ = _separated()
    model = BayesianGMM(3, 2, "full")
    start = bayesian_gmm_init(model, data, seed=0)
    cycled = {name: value[CYCLE] for name, value in start.items()}
    run = sample_bayesian_gmm_nuts(
        model,
        data,
        num_samples=100,
        warmup_steps=100,
        num_chains=2,
        init=[start, cycled],
        jit_compile=True,  # halves the run time here
    )
    return model, data, run


def test_nuts_recovers_three_clusters(nuts_run):
    model, data, run = nuts_run
    assert run.samples["locs"].shape == (2, 100, 3, 2)
    assert run.samples["corr_cholesky"].shape == (2, 100, 3, 2, 2)
    assert sum(run.divergences) == 0
    aligned = align_labels(run.samples).samples
    means = {name: value.mean((0, 1)) for name, value in aligned.items()}
    _assert_recovers(means)
    # The posterior is concentrated: every draw of every mean is near its cluster.
    perm = _match_to_truth(means["locs"])
    err = (aligned["locs"][:, :, perm] - CENTERS).norm(dim=-1)
    assert err.max() < 0.6
    # Posterior responsibilities classify the points as generated.
    _, labels = _separated()
    resp = posterior_responsibilities(model, data, aligned)
    assert resp.shape == (150, 3)
    torch.testing.assert_close(resp.sum(-1), torch.ones(150, dtype=DTYPE))
    assert (perm[labels] == resp.argmax(-1)).float().mean() > 0.98


def test_nuts_label_switching_is_found_and_undone(nuts_run):
    """Chains in different permutations: the unaligned means are multimodal across chains,
    align_labels reports the cycle it undid, and the aligned chains agree."""
    _, _, run = nuts_run
    unaligned_means = run.samples["locs"].mean(1)  # (chain, K, d)
    assert (unaligned_means[0] - unaligned_means[1]).norm(dim=-1).min() > 4.0
    alignment = align_labels(run.samples)
    counts = alignment.permutation_counts()
    # Chain 0 is the reference; component k of chain 1 started at component CYCLE[k] of
    # chain 0, so chain 0's label j is chain 1's label argsort(CYCLE)[j].
    assert counts[0] == {(0, 1, 2): 100}
    assert counts[1] == {tuple(torch.argsort(CYCLE).tolist()): 100}
    assert alignment.switched[1].all() and not alignment.switched[0].any()
    aligned_means = alignment.samples["locs"].mean(1)
    torch.testing.assert_close(aligned_means[0], aligned_means[1], atol=0.1, rtol=0)
    # Every component site moved together with the means.
    for name in ("weights", "scales", "corr_cholesky"):
        torch.testing.assert_close(
            alignment.samples[name][1], run.samples[name][1][:, torch.argsort(CYCLE)]
        )
    assert "chain 1: [2, 0, 1]: 100/100" in alignment.summary()
    # The input is kept as sampled.
    assert alignment.unaligned["locs"] is run.samples["locs"]


def test_align_labels_undoes_random_permutations():
    """Synthetic draws around known means, each with its labels shuffled at random."""
    generator = torch.Generator().manual_seed(0)
    K, d, S = 4, 3, 200
    truth = 5 * torch.randn(K, d, generator=generator, dtype=DTYPE)
    locs = truth + 0.3 * torch.randn(S, K, d, generator=generator, dtype=DTYPE)
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=DTYPE).expand(S, K)
    shuffles = torch.stack([torch.randperm(K, generator=generator) for _ in range(S)])
    shuffled = {
        "locs": locs.gather(1, shuffles[:, :, None].expand(S, K, d)),
        "weights": weights.gather(1, shuffles),
        "sigma": torch.ones(S),  # a site without a component dim is left alone
    }
    alignment = align_labels(shuffled, reference=truth)
    torch.testing.assert_close(alignment.samples["locs"], locs)
    torch.testing.assert_close(alignment.samples["weights"], weights)
    assert alignment.samples["sigma"] is shuffled["sigma"]
    # Without a reference the labels agree with the first draw's (up to one relabeling).
    free = align_labels(shuffled)
    relabel = torch.cdist(truth, free.reference).argmin(-1)
    torch.testing.assert_close(free.samples["locs"][:, relabel], locs)
    assert free.switched.sum() > S // 2


def test_align_labels_hungarian_for_many_components():
    """K > 6 takes the Hungarian path; it must find the same relabeling."""
    generator = torch.Generator().manual_seed(1)
    K, S = 8, 20
    truth = 10 * torch.randn(K, 2, generator=generator, dtype=DTYPE)
    locs = truth + 0.1 * torch.randn(S, K, 2, generator=generator, dtype=DTYPE)
    shuffles = torch.stack([torch.randperm(K, generator=generator) for _ in range(S)])
    shuffled = locs.gather(1, shuffles[:, :, None].expand(S, K, 2))
    alignment = align_labels({"locs": shuffled}, reference=truth)
    torch.testing.assert_close(alignment.samples["locs"], locs)
    # perm[s, k] is the input label that became label k.
    torch.testing.assert_close(alignment.permutations, torch.argsort(shuffles, dim=-1))


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_svi_delta_is_map_em(covariance):
    """AutoDelta with TraceEnum_ELBO and MAP-EM maximize the same log posterior."""
    data, _ = _separated()
    model = BayesianGMM(3, 2, covariance)
    em = fit_bayesian_gmm_map_em(model, data)
    svi = fit_bayesian_gmm_svi(model, data, "delta", num_steps=300, lr=0.05)
    assert em.converged
    _assert_recovers(em.params)
    for name, value in svi.params.items():
        torch.testing.assert_close(value, em.params[name], atol=1e-4, rtol=0)
    assert -svi.history["loss"][-1] == pytest.approx(em.log_posterior[-1], abs=1e-6)


def test_svi_normal_recovers_three_clusters():
    data, _ = _separated()
    model = BayesianGMM(3, 2, "full")
    fit = fit_bayesian_gmm_svi(model, data, "normal", num_steps=300, lr=0.05)
    _assert_recovers(fit.params)
    # The posterior sd of a mean coordinate is about SD / sqrt(50) = 0.1.
    sd = fit.guide.quantiles([0.1587, 0.8413], data)["locs"].diff(dim=0).squeeze(0) / 2
    assert ((sd > 0.03) & (sd < 0.3)).all()


@pytest.mark.parametrize("covariance", ["full", "diag"])
def test_map_em_monotone_and_stationary(covariance):
    """Overlapping clusters (hundreds of EM iterations): the log posterior never decreases,
    and at the fixed point its gradient in the unconstrained space vanishes."""
    data = _overlapping()
    model = BayesianGMM(3, 2, covariance)
    fit = fit_bayesian_gmm_map_em(model, data, tol=1e-13, max_iter=3000, m_step_iters=5, seed=3)
    history = np.array(fit.log_posterior)
    assert fit.converged and fit.num_iterations > 100
    assert np.diff(history).min() > -1e-9 * abs(history[-1])
    assert history[-1] > history[0] + 10
    priors = model.priors(dtype=DTYPE)
    transforms = {name: biject_to(priors[name].support) for name in model.global_sites}
    free = {n: transforms[n].inv(v).detach().requires_grad_() for n, v in fit.params.items()}
    value = model.log_joint(data, {n: transforms[n](u) for n, u in free.items()})
    grads = torch.autograd.grad(value, list(free.values()))
    assert max(g.abs().max().item() for g in grads) < 1e-3
    # A small step off the fixed point lowers the log posterior (a maximum, not a saddle).
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(5):
            moved = {
                n: transforms[n](u + 1e-2 * torch.randn(u.shape, generator=generator, dtype=DTYPE))
                for n, u in free.items()
            }
            assert model.log_joint(data, moved) < value


def test_infer_discrete_assignments_follow_responsibilities():
    data = _overlapping(30)
    model = BayesianGMM(3, 2, "full")
    params = fit_bayesian_gmm_map_em(model, data, max_iter=20).params
    resp = model.responsibilities(data, params)
    torch.testing.assert_close(enumerated_responsibilities(model, data, params), resp)
    # temperature 0: the most probable component of every point.
    assert torch.equal(infer_assignments(model, data, params, temperature=0), resp.argmax(-1))
    # temperature 1: draws from p(z | x); 3 ambiguous points, each copied 3000 times.
    ambiguous = (resp.max(-1).values < 0.8).nonzero().squeeze(-1)[:3]
    assert len(ambiguous) == 3
    copies = data[ambiguous].repeat_interleave(3000, dim=0)
    draws = infer_assignments(model, copies, params, temperature=1, seed=0).reshape(3, 3000)
    freq = torch.stack([torch.bincount(row, minlength=3) for row in draws]).to(DTYPE) / 3000
    torch.testing.assert_close(freq, resp[ambiguous], atol=0.04, rtol=0)


def test_seeds_make_fits_deterministic():
    data, _ = _separated(60)
    model = BayesianGMM(3, 2, "diag")
    a = fit_bayesian_gmm_svi(model, data, "normal", num_steps=20, seed=5)
    b = fit_bayesian_gmm_svi(model, data, "normal", num_steps=20, seed=5)
    assert a.history["loss"] == b.history["loss"]


def test_fit_argument_errors():
    data, _ = _separated(30)
    model = BayesianGMM(3, 2)
    with pytest.raises(TypeError, match="model"):
        fit_bayesian_gmm_map_em(object(), data)
    with pytest.raises(ValueError, match="fewer than num_components"):
        fit_bayesian_gmm_map_em(model, data[:2])
    with pytest.raises(ValueError, match="concentration >= 1"):
        fit_bayesian_gmm_map_em(BayesianGMM(3, 2, concentration=0.5), data)
    with pytest.raises(ValueError, match="guide"):
        fit_bayesian_gmm_svi(model, data, "laplace")
    with pytest.raises(ValueError, match="init has 1 entries"):
        sample_bayesian_gmm_nuts(model, data, num_chains=2, init=[bayesian_gmm_init(model, data)])
    with pytest.raises(ValueError, match="missing the site"):
        fit_bayesian_gmm_map_em(model, data, init={"locs": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match="temperature"):
        infer_assignments(model, data, bayesian_gmm_init(model, data), temperature=2)
    with pytest.raises(ValueError, match="locs"):
        align_labels({"weights": torch.ones(4, 3) / 3})
    nan = data.clone()
    nan[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fit_bayesian_gmm_svi(model, nan)
