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
