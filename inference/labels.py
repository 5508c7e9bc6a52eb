"""Label switching: relabel the draws of a mixture posterior to a common reference.

A mixture's posterior is invariant under the K! permutations of the component labels, so
chains and fits land in different copies of each mode.
[`align_labels`][inference.align_labels] matches every draw's component means to a reference
(all permutations for small K, the Hungarian algorithm above), re-averages the reference
until the labels settle, and keeps both the aligned and the unaligned draws with the
permutations applied: the switching is shown, not hidden.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass

import torch
from torch import Tensor

from pyro_cwm.models.bayesian_gmm import BayesianGMM

__all__ = ["LabelAlignment", "align_labels"]



@dataclass
class LabelAlignment:
    """Draws relabeled to a common reference, with the permutations that were applied.

    Attributes:
        samples: the aligned draws (same shapes as the input): component ``k`` of draw ``s``
            is component ``permutations[s, k]`` of the input draw.
        unaligned: the input draws, untouched (their means are multimodal when labels switch).
        permutations: long tensor (*batch, K), e.g. (chains, draws, K).
        reference: the reference means (K, d) the draws were matched to.
        iterations: number of align / re-average rounds.
    """

    samples: dict[str, Tensor]
    unaligned: dict[str, Tensor]
    permutations: Tensor
    reference: Tensor
    iterations: int

    @property
    def switched(self) -> Tensor:
        """Bool (*batch,): draws whose labels were permuted (not the identity)."""
        identity = torch.arange(self.permutations.shape[-1], device=self.permutations.device)
        return (self.permutations != identity).any(-1)

    def permutation_counts(self) -> list[dict[tuple[int, ...], int]]:
        """For every chain (first batch dim), how many draws needed each permutation.

        With one batch dim (no chains) the list has a single entry for all draws.
        """
        perms = self.permutations
        if perms.dim() == 2:
            perms = perms.unsqueeze(0)
        flat = perms.reshape(perms.shape[0], -1, perms.shape[-1]).tolist()
        return [dict(Counter(tuple(p) for p in chain)) for chain in flat]

    def summary(self) -> str:
        """Readable report of the label switching found, one line per chain."""
        lines = [f"label alignment to a reference of {self.reference.shape[0]} components"]
        for chain, counts in enumerate(self.permutation_counts()):
            total = sum(counts.values())
            parts = ", ".join(
                f"{list(p)}: {n}/{total}" for p, n in sorted(counts.items(), key=lambda t: -t[1])
            )
            lines.append(f"chain {chain}: {parts}")
        lines.append(f"draws relabeled: {int(self.switched.sum())}/{self.switched.numel()}")
        return "\n".join(lines)


def _best_permutations(locs: Tensor, reference: Tensor) -> Tensor:
    """For draws (S, K, d), the permutation (S, K) minimizing sum_k |locs[perm[k]] - ref[k]|^2.

    Exhaustive over the K! permutations for K <= 6 (vectorized); the Hungarian algorithm
    (``scipy.optimize.linear_sum_assignment``) per draw for larger K.
    """
    K = reference.shape[0]
    cost = ((locs.unsqueeze(-2) - reference) ** 2).sum(-1)  # (S, j, k): draw comp j -> ref k
    if K <= 6:
        perms = torch.tensor(list(itertools.permutations(range(K))), device=locs.device)
        # total[s, p] = sum_k cost[s, perms[p, k], k]
        total = cost[:, perms, torch.arange(K, device=locs.device)].sum(-1)
        return perms[total.argmin(-1)]
    from scipy.optimize import linear_sum_assignment

    rows = []
    for c in cost.detach().cpu().numpy():
        j, k = linear_sum_assignment(c)
        perm = [0] * K
        for jj, kk in zip(j, k):
            perm[kk] = int(jj)
        rows.append(perm)
    return torch.tensor(rows, device=locs.device)


def _permute(samples: dict[str, Tensor], perms: Tensor) -> dict[str, Tensor]:
    out = {}
    for name, value in samples.items():
        right = BayesianGMM.COMPONENT_SITES.get(name)
        if right is None:
            out[name] = value
            continue
        shape = value.shape
        flat = value.reshape((-1,) + shape[len(shape) - right - 1 :])  # (S, K, ...)
        index = perms.reshape((perms.shape[0], perms.shape[1]) + (1,) * right).expand(flat.shape)
        out[name] = flat.gather(1, index).reshape(shape)
    return out


def align_labels(
    samples: dict[str, Tensor],
    reference: Tensor | None = None,
    *,
    max_iter: int = 20,
) -> LabelAlignment:
    """Relabel draws of a mixture so that component ``k`` means the same cluster in all.

    Each draw's components are matched to reference means by minimizing the summed squared
    distance of the means (exhaustively for K <= 6, else by the Hungarian algorithm). The
    reference starts as ``reference`` or as the first draw's means, and is replaced by the
    mean of the aligned means until no permutation changes (a k-means over relabelings, in
    the spirit of Stephens, 2000). Sites with a component dim (``weights``, ``locs``,
    ``scales``, ``corr_cholesky``) are permuted together; other sites are kept.

    Args:
        samples: ``{site: tensor}`` with ``locs`` of shape (*batch, K, d) and the other
            component sites with the same leading dims (e.g. (chains, draws)).
        reference: means (K, d) to align to (e.g. a MAP fit), or None.
        max_iter: maximum number of align / re-average rounds.

    Raises:
        ValueError: if ``samples`` has no ``locs`` or shapes disagree.
    """
    if "locs" not in samples:
        raise ValueError("samples must contain the 'locs' site")
    locs = samples["locs"]
    if locs.dim() < 3:
        raise ValueError(
            f"samples['locs'] must have shape (*batch, K, d), got {tuple(locs.shape)}"
        )
    batch, (K, d) = locs.shape[:-2], locs.shape[-2:]
    for name, right in BayesianGMM.COMPONENT_SITES.items():
        if name in samples:
            value = samples[name]
            if value.numel() != batch.numel() * K * (d**right):
                raise ValueError(
                    f"samples[{name!r}] of shape {tuple(value.shape)} does not match "
                    f"locs of shape {tuple(locs.shape)}"
                )
    flat_locs = locs.reshape(-1, K, d)
    fixed = reference is not None
    ref = (flat_locs[0] if reference is None else reference.to(flat_locs)).clone()
    if ref.shape != (K, d):
        raise ValueError(f"reference must have shape ({K}, {d}), got {tuple(ref.shape)}")
    perms = None
    iterations = 0
    for iterations in range(1, max_iter + 1):  # noqa: B007 (reported)
        new = _best_permutations(flat_locs, ref)
        if perms is not None and torch.equal(new, perms):
            break
        perms = new
        if fixed:
            break
        ref = flat_locs.gather(1, perms.unsqueeze(-1).expand_as(flat_locs)).mean(0)
    aligned = _permute(samples, perms)
    return LabelAlignment(
        samples=aligned,
        unaligned=dict(samples),
        permutations=perms.reshape(batch + (K,)),
        reference=ref,
        iterations=iterations,
    )
