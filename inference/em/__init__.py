"""The EM engine: Gaussian mixtures (every covariance family), k-means, mixtures of experts.

An EM iteration is one pass over the data in chunks: the E-step of a chunk gives its
responsibilities, which are folded at once into additive sufficient statistics
(``inference.em.families.SufficientStatistics``); the M-step turns the summed statistics
into new parameters. Nothing of size (N, K) is kept, so the data can be a memory-mapped
array larger than memory, and data-parallel EM only has to sum the statistics across
processes (one all-reduce) before the M-step.

- `inference.em.loop`: the EM loop, once for every family (full batch and stepwise).
- `inference.em.families`: per family, the E-step log-densities, statistics and M-step.
- `inference.em.estep`: the fast E-step (reused buffers, GEMMs, moments about the origin
  where they are accurate) and the rule that falls back to the centered scheme.
- `inference.em.estimator`: [`GaussianMixtureEM`][inference.GaussianMixtureEM], with
  scikit-learn's API.
- `inference.em.readers`: the out-of-core readers: the data of a fit in row chunks, from a
  tensor or a memory-mapped array read at a resident memory that does not grow with it.
- `inference.em.kmeans`: k-means++ seeding and Lloyd's k-means (initialization).
- `inference.em.pretrain`: [`em_pretrain`][inference.em_pretrain], a CWM started from a
  fitted mixture.
- `inference.em.experts`: [`fit_experts_em`][inference.fit_experts_em], mixtures of experts.
- `inference.em.distributed`: [`all_reduce_sum`][inference.em.distributed.all_reduce_sum],
  the cross-process sum that makes the same fit run on one process or many.
"""

from inference.em.distributed import all_reduce_sum
from inference.em.estimator import GaussianMixtureEM
from inference.em.experts import ExpertsEMRun, fit_experts_em
from inference.em.pretrain import em_pretrain

__all__ = ["ExpertsEMRun", "GaussianMixtureEM", "all_reduce_sum", "em_pretrain", "fit_experts_em"]
