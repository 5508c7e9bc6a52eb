"""Autoguides whose posteriors are mixtures, and what a hand-written guide needs to hold a
CWM."""

from pyro_cwm.guides.autocwm import AutoCWM
from pyro_cwm.guides.local import AutoLocalNormal
from pyro_cwm.guides.log_joint import log_joint_route
from pyro_cwm.guides.rao_blackwell import CWMReparam, rao_blackwellize

__all__ = ["AutoCWM", "AutoLocalNormal", "CWMReparam", "log_joint_route", "rao_blackwellize"]
