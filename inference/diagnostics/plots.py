"""Figures of fitted densities (matplotlib, written to files)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402


def _limits(points: np.ndarray, margin: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    low, high = points.min(0), points.max(0)
    pad = margin * (high - low) + 1e-6
    return low - pad, high + pad


def plot_density(
    distribution,
    data: Tensor,
    path: str | Path,
    samples: Tensor | None = None,
    grid_size: int = 200,
) -> None:
    """Draw data against a fitted 1-D or 2-D density and write a PNG to ``path``.

    1-D: a histogram of the data under the density curve. 2-D: data, the density on a
    grid and model samples side by side. ``distribution`` is unconditional; pass
    ``samples`` (e.g. drawn at the data's contexts) to show samples of a conditional model
    instead of its density.

    Raises:
        ValueError: if the data are not 1-D or 2-D points.
    """
    data_np = data.detach().cpu().numpy()
    dim = data_np.shape[1]
    if dim not in (1, 2):
        raise ValueError(f"plot_density draws 1-D or 2-D data, got dim={dim}")
    like = data  # grids take the data's dtype and device
    if samples is None:
        samples = distribution.sample((data.shape[0],))
    samples_np = samples.detach().cpu().numpy()
    low, high = _limits(data_np)
    if dim == 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.hist(data_np[:, 0], bins=60, density=True, alpha=0.4, label="data")
        ax.hist(samples_np[:, 0], bins=60, density=True, histtype="step", label="model samples")
        if distribution is not None and not distribution.batch_shape:
            grid = torch.linspace(
                float(low[0]), float(high[0]), grid_size, dtype=like.dtype, device=like.device
            )[:, None]
            with torch.no_grad():
                density = distribution.log_prob(grid).exp().cpu().numpy()
            ax.plot(grid.cpu().numpy()[:, 0], density, label="model density")
        ax.legend()
    else:
        show_density = distribution is not None and not distribution.batch_shape
        fig, axes = plt.subplots(
            1, 3 if show_density else 2, figsize=(15 if show_density else 10, 5)
        )
        bounds = [[low[0], high[0]], [low[1], high[1]]]
        axes[0].hist2d(data_np[:, 0], data_np[:, 1], bins=100, range=bounds, cmap="viridis")
        axes[0].set_title("data")
        axes[-1].hist2d(samples_np[:, 0], samples_np[:, 1], bins=100, range=bounds, cmap="viridis")
        axes[-1].set_title("model samples")
        if show_density:
            xs = torch.linspace(float(low[0]), float(high[0]), grid_size, dtype=like.dtype)
            ys = torch.linspace(float(low[1]), float(high[1]), grid_size, dtype=like.dtype)
            mesh = torch.cartesian_prod(xs, ys).to(like.device)
            with torch.no_grad():
                density = distribution.log_prob(mesh).exp().reshape(grid_size, grid_size).cpu()
            axes[1].pcolormesh(xs.numpy(), ys.numpy(), density.numpy().T, cmap="viridis")
            axes[1].set_title("model density")
        for ax in axes:
            ax.set_aspect("auto")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_gaussian_mixture(
    data: Tensor | np.ndarray,
    weights: Tensor | np.ndarray,
    means: Tensor | np.ndarray,
    covariances: Tensor | np.ndarray,
    path: str | Path,
    labels: np.ndarray | None = None,
) -> None:
    """Draw 2-D data with each component's 1- and 2-sd ellipses; write a PNG to ``path``.

    ``covariances`` are dense (K, 2, 2) matrices; ``labels`` (N,) colours the points.

    Raises:
        ValueError: if the data or the means are not 2-D.
    """
    from matplotlib.patches import Ellipse

    data, weights, means, covariances = (
        v.detach().cpu().numpy() if isinstance(v, Tensor) else np.asarray(v)
        for v in (data, weights, means, covariances)
    )
    if data.ndim != 2 or data.shape[1] != 2 or means.shape[-1] != 2:
        raise ValueError(f"plot_gaussian_mixture draws 2-D data, got shape {data.shape}")
    fig, ax = plt.subplots(figsize=(6.5, 6))
    ax.scatter(data[:, 0], data[:, 1], s=3, c=labels, cmap="tab20", alpha=0.5, linewidths=0)
    for k in range(means.shape[0]):
        values, vectors = np.linalg.eigh(covariances[k])
        angle = np.degrees(np.arctan2(vectors[1, -1], vectors[0, -1]))
        for n_sd in (1, 2):
            width, height = 2 * n_sd * np.sqrt(np.maximum(values[::-1], 0))
            ax.add_patch(
                Ellipse(
                    means[k],
                    width,
                    height,
                    angle=angle,
                    fill=False,
                    color="crimson",
                    lw=1.5 / n_sd,
                    alpha=0.9,
                )
            )
        ax.annotate(f"{weights[k]:.2f}", means[k], color="crimson", fontsize=8, ha="center")
    low, high = _limits(np.vstack([data, means]))
    ax.set_xlim(low[0], high[0])
    ax.set_ylim(low[1], high[1])
    ax.set_title(f"Gaussian mixture, K={means.shape[0]} (1 and 2 sd; weights)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
