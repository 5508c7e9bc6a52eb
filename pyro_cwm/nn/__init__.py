"""Building blocks: classifiers (mixture weights), K-vectorized invertible maps, the CWM module."""

from pyro_cwm.nn.classifiers import ConstantWeights, SoftmaxClassifier
from pyro_cwm.nn.cwm import CWM
from pyro_cwm.nn.maps import MAPS, AffineMaps, FlowMaps, LocationScaleMaps, build_maps

__all__ = [
    "CWM",
    "MAPS",
    "AffineMaps",
    "ConstantWeights",
    "FlowMaps",
    "LocationScaleMaps",
    "SoftmaxClassifier",
    "build_maps",
]
