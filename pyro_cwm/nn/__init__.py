"""Building blocks: classifiers, K-vectorized invertible maps, the CWM and GMM modules."""

from pyro_cwm.nn.classifiers import ConstantWeights, SoftmaxClassifier
from pyro_cwm.nn.cwm import CWM
from pyro_cwm.nn.encoder import CWMEncoder
from pyro_cwm.nn.gmm import GMM
from pyro_cwm.nn.maps import (
    MAP_CHOICES,
    MAPS,
    AffineMaps,
    FlowMaps,
    LocationScaleMaps,
    build_maps,
    map_arguments,
)

__all__ = [
    "CWM",
    "CWMEncoder",
    "GMM",
    "MAPS",
    "AffineMaps",
    "ConstantWeights",
    "FlowMaps",
    "LocationScaleMaps",
    "SoftmaxClassifier",
    "build_maps",
    "MAP_CHOICES",
    "map_arguments",
]
