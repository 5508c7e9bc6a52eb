"""Pyro models built from mixtures: the Bayesian Gaussian mixture, ..."""

from pyro_cwm.models.bayesian_gmm import BayesianGMM

__all__ = ["BayesianGMM"]
