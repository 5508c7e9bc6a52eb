"""Mixture distributions, as ``TorchDistribution`` subclasses."""

from pyro_cwm.distributions.cwm import ClassifierWeightedMixture

__all__ = ["ClassifierWeightedMixture"]
