"""k-means++ seeding and Lloyd's k-means on torch tensors (initialization of EM).

Both run on one tensor or, with ``sharded=True``, on this process's shard of a data set
split across the processes of a `torch.distributed` group (the shards concatenated in rank
order are the data set). Every sum over the points goes through
[`all_reduce_sum`][inference.em.distributed.all_reduce_sum], and every random draw is made
from the same generator state on every process, so the processes agree on every choice
and the result equals, up to rounding, the result on the concatenated data in one process.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from inference.em.distributed import all_reduce_sum, global_rows, rank_and_size, shard_offset


def _sums(sharded: bool):
    return all_reduce_sum if sharded else (lambda values: values)


def _draw_by_weight(weights: Tensor, uniforms: Tensor, offset: int, sharded: bool) -> Tensor:
    """Global indices (m,) of points drawn with probability proportional to ``weights``.

    ``weights`` (n,) are this shard's non-negative weights (not all zero over the data set);
    ``uniforms`` (m,) are float64 numbers in [0, 1), the same on every process. Inverse-CDF
    sampling where the points live: the first point whose cumulative weight exceeds
    ``u * total`` is drawn; the process that holds it reports its global index, the others
    zeros, and a sum tells every process.
    """
    rank, size = rank_and_size() if sharded else (0, 1)
    cumulative = weights.double().cumsum(0)
    totals = cumulative.new_zeros(size)
    if weights.shape[0]:
        totals[rank] = cumulative[-1]
    totals = _sums(sharded)(totals)
    ends = totals.cumsum(0)
    targets = uniforms.to(cumulative.device) * ends[-1]
    owner = torch.searchsorted(ends, targets, right=True)
    owner = owner.clamp_max(int((totals > 0).nonzero().max()))  # u * total rounded to total
    start = ends[rank - 1] if rank else 0.0  # the weight of the shards before this one
    local = torch.searchsorted(cumulative, targets - start, right=True)
    local = local.clamp_max(max(weights.shape[0] - 1, 0))
    index = torch.where(owner == rank, local + offset, torch.zeros_like(local))
    return _sums(sharded)(index)


def kmeans_plus_plus(
    data: Tensor,
    num_clusters: int,
    generator: torch.Generator,
    local_trials: int | None = None,
    *,
    sharded: bool = False,
) -> tuple[Tensor, Tensor]:
    """Greedy k-means++ seeding (Arthur & Vassilvitskii, 2007): seed indices and seeds.

    Each new seed is chosen among ``local_trials`` data points drawn with probability
    proportional to their squared distance to the nearest seed so far: the candidate that
    lowers the total squared distance most (default ``2 + log K`` trials, as in
    scikit-learn).

    Args:
        data: the points (n, d), or this process's shard of them with ``sharded``.
        num_clusters: K.
        generator: a CPU generator, in the same state on every process with ``sharded``.
        local_trials: candidates per seed.
        sharded: ``data`` is one shard of a data set split across a `torch.distributed`
            group (no effect without a group); every process calls this.

    Returns:
        The seeds' global row indices (K,) (int64, on the data's device) and the seeds
        (K, d), the same on every process.
    """
    n = data.shape[0]
    offset, total_rows = shard_offset(n) if sharded else (0, n)
    reduce = _sums(sharded)
    trials = local_trials or 2 + int(math.log(num_clusters))
    first = torch.randint(total_rows, (1,), generator=generator).to(data.device)
    seeds = [global_rows(data, first, offset)]
    indices = [first]
    nearest = ((data - seeds[0]) ** 2).sum(-1)
    for _ in range(1, num_clusters):
        total = reduce(nearest.sum())
        if total <= 0:  # every point coincides with a seed: pick any point
            candidates = torch.randint(total_rows, (1,), generator=generator)
        else:
            uniforms = torch.rand(trials, generator=generator, dtype=torch.float64)
            candidates = _draw_by_weight(nearest, uniforms, offset, sharded)
        candidates = candidates.to(data.device)
        rows = global_rows(data, candidates, offset)
        distances = torch.minimum(nearest, torch.cdist(rows, data).square())
        best = reduce(distances.sum(-1)).argmin()
        indices.append(candidates[best : best + 1])
        seeds.append(rows[best : best + 1])
        nearest = distances[best]
    return torch.cat(indices), torch.cat(seeds)


def kmeans_plus_plus_indices(
    data: Tensor, num_clusters: int, generator: torch.Generator, local_trials: int | None = None
) -> Tensor:
    """The seed indices (K,) of ``kmeans_plus_plus`` on one tensor."""
    return kmeans_plus_plus(data, num_clusters, generator, local_trials)[0]


def kmeans(
    data: Tensor,
    num_clusters: int,
    generator: torch.Generator,
    max_iter: int = 300,
    *,
    sharded: bool = False,
) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means from a k-means++ start: ``(centers (K, d), labels (n,))``.

    An empty cluster keeps its previous center. With ``sharded`` (see ``kmeans_plus_plus``)
    the sums and counts of the clusters are summed over the processes, the centers are the
    same on every process and the labels are those of this process's shard.
    """
    reduce = _sums(sharded)
    centers = kmeans_plus_plus(data, num_clusters, generator, sharded=sharded)[1]
    labels = torch.cdist(data, centers).argmin(-1)
    for _ in range(max_iter):
        counts = torch.bincount(labels, minlength=num_clusters).to(data.dtype)
        sums = torch.zeros_like(centers).index_add_(0, labels, data)
        counts, sums = reduce([counts, sums])
        filled = counts > 0
        centers = torch.where(filled[:, None], sums / counts.clamp_min(1)[:, None], centers)
        new_labels = torch.cdist(data, centers).argmin(-1)
        if int(reduce((new_labels != labels).sum())) == 0:
            break
        labels = new_labels
    return centers, labels
