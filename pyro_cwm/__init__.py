"""pyro-cwm: Classifier Weighted Mixtures and other mixture models for Pyro.

``pyro_cwm`` holds what is modelled (distributions, modules, Pyro models, guides); the
``inference`` package holds how it is fitted (SVI and EM loops, diagnostics, command line).
"""

from pyro_cwm.distributions import ClassifierWeightedMixture, GaussianMixture
from pyro_cwm.nn import CWM, CWMEncoder

__all__ = ["CWM", "CWMEncoder", "ClassifierWeightedMixture", "GaussianMixture"]
__version__ = "0.1.0"
