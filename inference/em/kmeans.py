"""k-means++ seeding and Lloyd's k-means on torch tensors (initialization of EM)."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def kmeans_plus_plus_indices(
    data: Tensor, num_clusters: int, generator: torch.Generator, local_trials: int | None = None
) -> Tensor:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii, 2007): indices (K,) of the seeds.

    Each new seed is chosen among ``local_trials`` data points drawn with probability
    proportional to their squared distance to the nearest seed so far: the candidate that
    lowers the total squared distance most (default ``2 + log K`` trials, as in
    scikit-learn). ``generator`` must live on the CPU.
    """
    n = data.shape[0]
    trials = local_trials or 2 + int(math.log(num_clusters))
    first = torch.randint(n, (1,), generator=generator).item()
    indices = [first]
    nearest = ((data - data[first]) ** 2).sum(-1)
    for _ in range(1, num_clusters):
        total = nearest.sum()
        if total <= 0:  # every point coincides with a seed: pick any point
            candidates = torch.randint(n, (1,), generator=generator)
        else:
            probs = (nearest / total).double().cpu()
            candidates = torch.multinomial(probs, trials, replacement=True, generator=generator)
        candidates = candidates.to(data.device)
        distances = torch.minimum(nearest, torch.cdist(data[candidates], data).square())
        best = distances.sum(-1).argmin()
        indices.append(int(candidates[best]))
        nearest = distances[best]
    return torch.tensor(indices, device=data.device)


def kmeans_plus_plus(data: Tensor, num_clusters: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeds, shape (K, d): see ``kmeans_plus_plus_indices``."""
    return data[kmeans_plus_plus_indices(data, num_clusters, generator)]


def kmeans(
    data: Tensor, num_clusters: int, generator: torch.Generator, max_iter: int = 300
) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means from a k-means++ start: ``(centers (K, d), labels (N,))``.

    An empty cluster keeps its previous center.
    """
    centers = kmeans_plus_plus(data, num_clusters, generator)
    labels = torch.cdist(data, centers).argmin(-1)
    for _ in range(max_iter):
        counts = torch.bincount(labels, minlength=num_clusters).to(data.dtype)
        sums = torch.zeros_like(centers).index_add_(0, labels, data)
        filled = counts > 0
        centers = torch.where(filled[:, None], sums / counts.clamp_min(1)[:, None], centers)
        new_labels = torch.cdist(data, centers).argmin(-1)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return centers, labels
