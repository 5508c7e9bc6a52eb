"""How good a fit is: PSIS diagnostics, ArviZ conversion, sample metrics and figures.

- `inference.diagnostics.psis`: [`psis_diagnostic`][inference.psis_diagnostic], the Pareto
  k-hat of a guide's importance weights, with the IS log-evidence and the ELBO.
- `inference.diagnostics.inference_data`: [`to_inference_data`][inference.to_inference_data],
  fitted guides and MCMC runs as ArviZ ``InferenceData``.
- `inference.diagnostics.metrics`: sample-based comparisons with reference draws (energy
  distance, marginal errors, mode shares).
- `inference.diagnostics.plots`: figures of fitted densities written to files (matplotlib,
  imported on first use of a plot function).
"""

from inference.diagnostics.inference_data import to_inference_data
from inference.diagnostics.metrics import (
    energy_distance,
    marginal_errors,
    mode_shares,
    worst_mode_share_error,
)
from inference.diagnostics.psis import PSISDiagnostic, log_importance_weights, psis_diagnostic

_PLOTS = ("plot_density", "plot_gaussian_mixture")


def __getattr__(name: str):
    # The plots import matplotlib (and select its Agg backend) only when one is asked for.
    if name in _PLOTS:
        from inference.diagnostics import plots

        return getattr(plots, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PSISDiagnostic",
    "energy_distance",
    "log_importance_weights",
    "marginal_errors",
    "mode_shares",
    "plot_density",
    "plot_gaussian_mixture",
    "psis_diagnostic",
    "to_inference_data",
    "worst_mode_share_error",
]
