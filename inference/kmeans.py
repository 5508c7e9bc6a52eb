"""k-means++ seeding and Lloyd's k-means on torch tensors (initialization of EM)."""

from __future__ import annotations

import torch
from torch import Tensor


def kmeans_plus_plus(data: Tensor, num_clusters: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii, 2007): centers of shape (K, d).

    Each new center is a data point drawn with probability proportional to its squared
    distance to the nearest center chosen so far. ``generator`` must live on the CPU.
    """
    n = data.shape[0]
    first = torch.randint(n, (1,), generator=generator).item()
    centers = [data[first]]
    nearest = ((data - data[first]) ** 2).sum(-1)
    for _ in range(1, num_clusters):
        total = nearest.sum()
        if total <= 0:  # every point coincides with a center: pick any point
            index = torch.randint(n, (1,), generator=generator).item()
        else:
            probs = (nearest / total).double().cpu()
            index = torch.multinomial(probs, 1, generator=generator).item()
        centers.append(data[index])
        nearest = torch.minimum(nearest, ((data - data[index]) ** 2).sum(-1))
    return torch.stack(centers)


def kmeans(
    data: Tensor, num_clusters: int, generator: torch.Generator, max_iter: int = 20
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
