"""EM pretraining: start a CWM from a Gaussian mixture fitted by EM."""

from __future__ import annotations

from inference.em.estimator import GaussianMixtureEM
from inference.validation import as_data_tensor


def em_pretrain(cwm, data, **options) -> GaussianMixtureEM:
    """Fit a diagonal Gaussian mixture to ``data`` by EM and copy it into ``cwm``.

    Afterwards the CWM's density equals the fitted mixture's (constant classifier with
    bias log weights, location-scale maps at the means and standard deviations). Under
    ``torchrun``, each process passes its shard of the data and every process's CWM gets
    the mixture fitted on all of them (see [`GaussianMixtureEM`][inference.GaussianMixtureEM]).

    Args:
        cwm (pyro_cwm.CWM): a [`CWM`][pyro_cwm.nn.CWM] (K is ``cwm.num_components``).
        data (torch.Tensor | numpy.ndarray): points (N, d) with d = ``cwm.dim``; the fit
            runs on their device.
        **options (Any): options of [`GaussianMixtureEM`][inference.GaussianMixtureEM]
            (``max_iter``, ``tol``, ``reg_covar``, ``random_state``, ...);
            ``covariance_type`` is ``"diag"``.

    Returns:
        The fitted [`GaussianMixtureEM`][inference.GaussianMixtureEM].

    Raises:
        ValueError: for data of the wrong shape or with NaN/inf, and as the estimator does.
    """
    data = as_data_tensor(data, dim=cwm.dim)
    options = {"tol": 1e-5, **options, "covariance_type": "diag"}
    gm = GaussianMixtureEM(cwm.num_components, **options).fit(data)
    params = gm.parameters()
    cwm.set_gaussian_mixture(params.weights, params.means, params.covariances.sqrt())
    return gm
