"""Pyro models built from mixtures: the Bayesian Gaussian mixture and FlowGMM."""

from pyro_cwm.models.bayesian_gmm import BayesianGMM
from pyro_cwm.models.flow_gmm import FlowGMM

__all__ = ["BayesianGMM", "FlowGMM"]
