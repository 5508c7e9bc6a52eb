"""Stochastic variational inference: the loop, the ELBOs, checkpoints and the cross-process
gradients.

- `inference.svi.loop`: [`fit_svi`][inference.fit_svi], the SVI loop (progress, history,
  early stopping, the default step-size schedule, checkpoint and resume).
- `inference.svi.elbo`: [`CWMELBO`][inference.CWMELBO], the Rao-Blackwellized ELBO of
  AutoCWM guides.
- `inference.svi.checkpoint`: atomic checkpoints of plain state.
- `inference.svi.data_parallel`: data-parallel SVI under ``torchrun``: each process's
  share of a subsampled plate, and the gradients averaged over the processes.
"""

from inference.svi.elbo import CWMELBO, cwm_guides
from inference.svi.loop import default_step_size, fit_svi

__all__ = ["CWMELBO", "cwm_guides", "default_step_size", "fit_svi"]
