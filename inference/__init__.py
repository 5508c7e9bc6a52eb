"""How pyro-cwm models are fitted: EM and maximum-likelihood loops, checkpoints, the CLI."""

from inference.density import fit_density
from inference.em import DiagonalGaussianMixtureFit, em_pretrain, fit_diagonal_gmm

__all__ = ["DiagonalGaussianMixtureFit", "em_pretrain", "fit_density", "fit_diagonal_gmm"]
