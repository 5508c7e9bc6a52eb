"""Autoguides whose posteriors are mixtures."""

from pyro_cwm.guides.autocwm import AutoCWM

__all__ = ["AutoCWM"]
