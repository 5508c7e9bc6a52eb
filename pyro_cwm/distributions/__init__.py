"""Mixture distributions, as ``TorchDistribution`` subclasses."""

from pyro_cwm.distributions.cwm import ClassifierWeightedMixture
from pyro_cwm.distributions.gaussian_mixture import COVARIANCE_TYPES, GaussianMixture

__all__ = ["COVARIANCE_TYPES", "ClassifierWeightedMixture", "GaussianMixture"]
