"""Pyro models built from mixtures: the Bayesian Gaussian mixture, mixtures of experts,
the mixture density network and FlowGMM."""

from pyro_cwm.models.bayesian_gmm import BayesianGMM
from pyro_cwm.models.flow_gmm import FlowGMM
from pyro_cwm.models.mdn import MixtureDensityNetwork
from pyro_cwm.models.mixture_of_experts import (
    BayesianLinearExperts,
    DirichletGate,
    Experts,
    Gate,
    MixtureOfExperts,
    MixtureOfModels,
    ModuleExperts,
    PerSampleDirichletGate,
    PriorMeanLink,
    PriorMeanRegularizer,
    PullPriorMeans,
    SoftmaxGate,
)

__all__ = [
    "BayesianGMM",
    "BayesianLinearExperts",
    "DirichletGate",
    "Experts",
    "FlowGMM",
    "Gate",
    "MixtureDensityNetwork",
    "MixtureOfExperts",
    "MixtureOfModels",
    "ModuleExperts",
    "PerSampleDirichletGate",
    "PriorMeanLink",
    "PriorMeanRegularizer",
    "PullPriorMeans",
    "SoftmaxGate",
]
