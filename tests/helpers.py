"""Shared test helpers."""

import torch

from pyro_cwm import CWM
from pyro_cwm.nn import MAP_CHOICES, map_arguments

# Every family of maps, and "maf": the flow family with an autoregressive affine flow.
MAP_KINDS = list(MAP_CHOICES)
FLOW_KINDS = ("flow", "maf", "iaf")


def map_kwargs(map, flow_hidden_dims=None):
    """CWM/AutoCWM keyword arguments for a name of MAP_KINDS (``map_arguments``), with
    ``flow_hidden_dims`` for the flow kinds."""
    kwargs = map_arguments(map)
    if map in FLOW_KINDS and flow_hidden_dims is not None:
        kwargs["map_options"] = {**(kwargs["map_options"] or {}),
                                 "flow_hidden_dims": flow_hidden_dims}
    return kwargs


def random_cwm(
    dim,
    num_components,
    map="location_scale",
    context_dim=0,
    scale=None,
    seed=0,
    hidden_dims=(16,),
    dtype=torch.float64,
):
    """A CWM whose every parameter is perturbed, so the classifier is not constant.

    Flow maps get a milder perturbation: strong random splines make spiky densities.
    """
    if scale is None:
        scale = 0.2 if map in FLOW_KINDS else 0.5
    torch.manual_seed(seed)
    cwm = CWM(
        dim,
        num_components,
        hidden_dims=hidden_dims,
        context_dim=context_dim,
        # Raw contexts: the grids of the quadrature tests are sized for this family.
        standardize_context=False,
        **map_kwargs(map, flow_hidden_dims=(16,)),
    ).to(dtype)
    # Perturb around the identity maps (not the spread start): the quadrature tests' grids
    # are sized for that family.
    ones = torch.ones(num_components, dim)
    cwm.set_gaussian_mixture(ones[:, 0], torch.zeros_like(ones), ones)
    with torch.no_grad():
        for p in cwm.parameters():
            p.add_(scale * torch.randn_like(p))
    return cwm


def binned_goodness_of_fit(dist, samples, low=-6.0, high=6.0, bins=8, nodes=16):
    """p-value of a chi-square test of ``samples`` against cell masses integrated from log_prob.

    The box [low, high]^d (d = 1 or 2) is cut into ``bins`` cells a side, plus one cell for
    the outside; each cell's probability comes from Gauss-Legendre quadrature of the
    density, so the test does not trust the sampler and ``log_prob`` to agree.
    """
    import numpy as np
    from scipy import stats

    dim = samples.shape[-1]
    gl_x, gl_w = np.polynomial.legendre.leggauss(nodes)
    edges = np.linspace(low, high, bins + 1)
    width = edges[1] - edges[0]
    # Quadrature points of every 1-D cell: (bins, nodes).
    points = edges[:-1, None] + (gl_x[None, :] + 1) * width / 2
    weights = np.broadcast_to(gl_w * width / 2, points.shape)
    with torch.no_grad():
        if dim == 1:
            x = torch.tensor(points.reshape(-1, 1))
            dens = dist.log_prob(x).exp().reshape(bins, nodes).numpy()
            probs = (dens * weights).sum(-1)
        else:
            xs = torch.tensor(points.reshape(-1))
            grid = torch.cartesian_prod(xs, xs)
            dens = dist.log_prob(grid).exp().reshape(bins, nodes, bins, nodes).numpy()
            probs = np.einsum("anbm,an,bm->ab", dens, weights, weights).reshape(-1)
    s = samples.numpy()
    inside = ((s >= low) & (s < high)).all(-1)
    cells = np.floor((s[inside] - low) / width).astype(int).clip(0, bins - 1)
    index = cells[:, 0] if dim == 1 else cells[:, 0] * bins + cells[:, 1]
    counts = np.bincount(index, minlength=bins**dim)
    probs = np.append(probs, max(1.0 - probs.sum(), 0.0))
    counts = np.append(counts, (~inside).sum())
    # Pearson's chi-square, pooling the cells expected to hold fewer than 5 points.
    expected = probs * len(s)
    small = expected < 5
    expected = np.append(expected[~small], expected[small].sum())
    counts = np.append(counts[~small], counts[small].sum())
    keep = expected > 0
    expected, counts = expected[keep], counts[keep]
    return stats.chisquare(counts, expected * counts.sum() / expected.sum()).pvalue


def composite_gauss_legendre(low, high, panels=80, nodes=40):
    """Nodes and weights of a composite Gauss-Legendre rule on [low, high] (numpy arrays)."""
    import numpy as np

    x, w = np.polynomial.legendre.leggauss(nodes)
    edges = np.linspace(low, high, panels + 1)
    half = (edges[1] - edges[0]) / 2
    points = (edges[:-1, None] + half * (x[None, :] + 1)).reshape(-1)
    return points, np.tile(w * half, panels)
