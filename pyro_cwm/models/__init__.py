"""Pyro models built from mixtures: the Bayesian Gaussian mixture, the mixture density network."""

from pyro_cwm.models.bayesian_gmm import BayesianGMM
from pyro_cwm.models.mdn import MixtureDensityNetwork

__all__ = ["BayesianGMM", "MixtureDensityNetwork"]
