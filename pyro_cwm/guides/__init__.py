"""Autoguides whose posteriors are mixtures, and what a hand-written guide needs to hold a
CWM."""

from pyro_cwm.guides.autocwm import AutoCWM
from pyro_cwm.guides.rao_blackwell import CWMReparam, rao_blackwellize

__all__ = ["AutoCWM", "CWMReparam", "rao_blackwellize"]
