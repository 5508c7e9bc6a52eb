"""How pyro-cwm models are fitted: EM and maximum-likelihood loops, ELBOs, checkpoints, the CLI."""

from inference.bayesian_gmm import (
    fit_bayesian_gmm_map_em,
    fit_bayesian_gmm_svi,
    sample_bayesian_gmm_nuts,
)
from inference.density import fit_density
from inference.diagnostics import PSISDiagnostic, psis_diagnostic, to_inference_data
from inference.em import ExpertsEMRun, GaussianMixtureEM, em_pretrain, fit_experts_em
from inference.flow_gmm import evaluate_flow_gmm, fit_flow_gmm
from inference.labels import LabelAlignment, align_labels
from inference.svi import default_step_size, fit_svi
from inference.svi.elbo import CWMELBO, unconstrained_log_joint
from inference.svi.optim import FusedClippedAdam

__all__ = [
    "CWMELBO",
    "em_pretrain",
    "fit_density",
    "fit_svi",
    "default_step_size",
    "FusedClippedAdam",
    "GaussianMixtureEM",
    "PSISDiagnostic",
    "psis_diagnostic",
    "to_inference_data",
    "unconstrained_log_joint",
    "LabelAlignment",
    "align_labels",
    "fit_bayesian_gmm_map_em",
    "fit_bayesian_gmm_svi",
    "sample_bayesian_gmm_nuts",
    "ExpertsEMRun",
    "evaluate_flow_gmm",
    "fit_experts_em",
    "fit_flow_gmm",
]
