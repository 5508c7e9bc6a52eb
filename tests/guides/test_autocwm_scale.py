"""AutoCWM above ``laplace_max_dim``: memory O(K D) and a start that scales."""

import pyro
import pytest
import torch

from inference import fit_svi
from inference.bench.scale import linear_posterior
from pyro_cwm.data.zoo import ar1_covariates
from pyro_cwm.data.zoo import linreg as linear
from pyro_cwm.guides import AutoCWM

D, N, K = 30, 200, 3


def data(seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=generator)
    y = x @ (torch.randn(D, generator=generator) / 3) + torch.randn(N, generator=generator)
    return x, y


def test_above_laplace_max_dim_the_guide_holds_no_d_by_d_tensor_and_climbs_k_starts():
    x, y = data()
    pyro.set_rng_seed(0)
    guide = AutoCWM(linear, num_components=K, laplace_max_dim=D - 1, laplace_rank=8)
    with torch.no_grad():
        guide(x, y)
    assert guide._starts() == K
    maps = guide.preconditioned_maps
    assert maps.diagonal and maps.matrix.shape == (D,) and maps.vectors.shape == (D, 8)
    tensors = list(guide.parameters()) + list(guide.buffers())
    assert not any(t.dim() >= 2 and t.shape[-2:] == (D, D) for t in tensors)
    assert guide._precise is None  # the set-up's float64 copy of the data is not kept
    # Below the limit the start is the dense Laplace one, from 8 K starts.
    small = AutoCWM(linear, num_components=K)
    with torch.no_grad():
        small(x, y)
    assert small._starts() == 8 * K and small.preconditioned_maps.matrix.shape == (D, D)


def test_the_diagonal_start_fits_a_regression_with_independent_covariates():
    x, y = data(1)
    mean, sd = linear_posterior(x, y)
    pyro.set_rng_seed(0)
    guide = AutoCWM(linear, num_components=2, laplace_max_dim=D - 1)
    fit_svi(linear, guide, x, y, num_steps=1500, progress=False)
    with torch.no_grad():
        draws = guide.get_posterior().sample((4000,)).double()
    assert ((draws.mean(0) - mean).abs() / sd).max() < 0.25
    ratio = draws.std(0) / sd
    assert 0.75 < ratio.min() and ratio.max() < 1.25


def test_above_laplace_max_dim_the_start_is_the_exact_posterior_of_a_correlated_regression():
    # AR(1) covariates (correlation 0.9): mean field's sds are 0.3-0.5 of the posterior's.
    generator = torch.Generator().manual_seed(2)
    x = ar1_covariates(N, D, generator)
    y = x @ (torch.randn(D, generator=generator) / 3) + torch.randn(N, generator=generator)
    mean, sd = linear_posterior(x, y)
    pyro.set_rng_seed(0)
    # A Krylov space of the whole dimension: L-BFGS's mode and the Hessian-vector products
    # give the exact Laplace approximation, which here is the posterior, before any step
    # (one component: K > 1 would be moved apart by init_scale).
    guide = AutoCWM(linear, num_components=1, laplace_max_dim=D - 1, laplace_rank=D)
    with torch.no_grad():
        guide(x, y)
        draws = guide.get_posterior().sample((8000,)).double()
    assert guide._best_is_mode
    assert ((draws.mean(0) - mean).abs() / sd).max() < 0.05
    ratio = draws.std(0) / sd
    assert 0.96 < ratio.min() and ratio.max() < 1.04


@pytest.mark.cuda
def test_above_laplace_max_dim_the_set_up_and_the_fit_run_on_cuda():
    # The L-BFGS climb (float32, then float64) and the Hessian-vector products on the GPU.
    x, y = (t.cuda() for t in data())
    pyro.set_rng_seed(0)
    guide = AutoCWM(linear, num_components=K, laplace_max_dim=D - 1, laplace_rank=8)
    fit_svi(linear, guide, x, y, num_steps=20, progress=False)
    assert guide.cwm.reference_loc.is_cuda and guide._best_is_mode
    mean, sd = linear_posterior(x.cpu(), y.cpu())
    with torch.no_grad():
        median = guide.median(x, y)["w"].double().cpu()
    assert ((median - mean).abs() / sd).max() < 1.0
