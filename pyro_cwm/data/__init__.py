"""Built-in data sets and targets (generated or shipped; nothing is downloaded)."""

from pyro_cwm.data.images import LogitTransform, pixel_density_sample
from pyro_cwm.data.posteriors import EIGHT_SCHOOLS_SIGMA, EIGHT_SCHOOLS_Y, eight_schools
from pyro_cwm.data.toy import (
    EXAMPLES,
    inverse_sine,
    make_example,
    ring_of_gaussians,
    two_moons,
    two_planes,
)
from pyro_cwm.data.toy2d import (
    TOY_DENSITIES,
    ToyDensity,
    checkerboard,
    eight_gaussians,
    moons,
    pinwheel,
    rings,
    spirals,
    toy_density,
)

__all__ = [
    "checkerboard",
    "eight_gaussians",
    "moons",
    "pinwheel",
    "rings",
    "spirals",
    "TOY_DENSITIES",
    "ToyDensity",
    "toy_density",
    "EIGHT_SCHOOLS_SIGMA",
    "EIGHT_SCHOOLS_Y",
    "eight_schools",
    "EXAMPLES",
    "inverse_sine",
    "LogitTransform",
    "make_example",
    "pixel_density_sample",
    "ring_of_gaussians",
    "two_moons",
    "two_planes",
]
